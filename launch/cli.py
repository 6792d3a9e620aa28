"""`moeyard` command line: train, prepare, export, import, generate, eval, dashboard and plan (COMMANDS maps each
to its handler)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from moeyard.interop.chat import ChatOptions, prepare_chat
from moeyard.interop.evaluate import SPLITS, evaluate, held_out
from moeyard.interop.generate import (
    Codec,
    Sampling,
    check_prompt,
    checkpoint_model,
    codec_of_data,
    generate,
    load_checkpoint_model,
    load_codec,
    load_hf_model,
)
from moeyard.interop.generate_ranks import Request, layout_of
from moeyard.interop.hf import check_hf_dir, export, hydra_overrides, read_hf_config
from moeyard.interop.prepare import prepare
from moeyard.job.compose import compose, conf_dir, load_resolved, to_yaml, write_resolved
from moeyard.job.schema import ConfigError, JobConfig
from moeyard.launch.generate_job import layout_job, run_generation
from moeyard.launch.launchers import launch
from moeyard.launch.validate import validate
from moeyard.moe.config import ModelConfig, MoEConfig
from moeyard.moe.model import Transformer
from moeyard.parallel import checkpoint as ckpt
from moeyard.parallel.dims import ParallelDims
from moeyard.plan.command import cmd_plan
from moeyard.profiling.dashboard import cmd_dashboard
from moeyard.train.checkpointing import is_hf_dir


def compose_error_line(err: Exception, overrides: list[str]) -> str:
    """One line naming the key, the value and the rule, from a Hydra/OmegaConf composition error."""
    # Hydra wraps the OmegaConf error that knows the key ("Error merging override model.dim=abc").
    cause = err.__cause__ if isinstance(err.__cause__, OmegaConfBaseException) else err
    key = getattr(cause, "full_key", None)
    if not key:  # e.g. an unknown group option: Hydra's message lists the available ones
        return " ".join(str(err).split()).split(" Config search path")[0]
    detail = str(cause).strip().splitlines()[0]
    given = next((o.lstrip("+~") for o in overrides if o.lstrip("+~").split("=", 1)[0] == key), key)
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)):
        return f"{given} is not a config field ({detail}) (rule: keys must be schema fields; check the spelling)"
    return f"{given}: {detail}"


TRAIN_USAGE = "usage: moeyard train [-h|--help] [--cfg job] [GROUP=OPTION ...] [KEY=VALUE ...]"


def parse_train_args(argv: list[str]) -> tuple[list[str], bool, str | None]:
    """Hydra's command-line conventions: the overrides, whether --help was asked, and --cfg's value."""
    overrides, want_help, show = [], False, None
    args = iter(argv)
    for arg in args:
        if arg in ("-h", "--help"):
            want_help = True
        elif arg in ("-c", "--cfg") or arg.startswith("--cfg="):
            show = arg.partition("=")[2] or next(args, "")
        elif arg.startswith("-"):
            raise ValueError(f"train: {arg} is not an option (rule: {TRAIN_USAGE.removeprefix('usage: ')})")
        else:
            overrides.append(arg)
    if show is not None and show != "job":
        raise ValueError(
            f"train: --cfg {show or '(missing)'} (rule: --cfg job prints the composed job config; moeyard "
            "composes without Hydra's own runtime config, so there is no hydra or all)"
        )
    return overrides, want_help, show


def default_options() -> str:
    """The options conf/config.yaml's defaults list picks, as overrides (model=debug moe=default ...)."""
    picked = []
    for item in OmegaConf.load(conf_dir() / "config.yaml").defaults:
        if not isinstance(item, str):
            picked += [f"{group.removeprefix('optional ')}={option}" for group, option in item.items() if option]
    return " ".join(picked)


def group_options() -> dict[str, list[str]]:
    """Each config group's options: YAML files of conf/ and presets registered in Hydra's config store alike."""
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        hydra = GlobalHydra.instance().hydra
        groups = [g for g in hydra.list_all_config_groups() if not g.startswith("hydra")]
        return {g: sorted(hydra.config_loader.get_group_options(g)) for g in sorted(groups)}


def train_help(cfg_yaml: str) -> str:
    """Usage, the config groups with their options (Hydra's `--help` layout), then the composed config."""
    return "\n".join(
        [
            TRAIN_USAGE,
            "Composes a job from the config groups and overrides, validates it, writes it resolved into run.dir",
            "and starts the configured launcher (nothing starts when the config breaks a rule).",
            "",
            "== Configuration groups ==",
            "Compose your configuration from those groups (GROUP=OPTION)",
            "",
            *(f"{group}: {', '.join(options)}" for group, options in group_options().items()),
            f"(defaults: {default_options()})",
            "",
            "== Config ==",
            "Override anything in the config (KEY=VALUE, e.g. train.steps=5)",
            "",
            cfg_yaml,
        ]
    )


def cmd_train(argv: list[str]) -> int:
    """Composes and validates the config once, writes it resolved, then starts the configured launcher.

    --help prints the groups and the composed config, --cfg job the composed config; both start nothing."""
    overrides, want_help, show = parse_train_args(argv)
    try:
        cfg = compose(overrides)
        if want_help or show:
            print(train_help(to_yaml(cfg)) if want_help else to_yaml(cfg), end="")
            return 0
        validate(cfg, cfg.launcher.world_size())
    except (HydraException, OmegaConfBaseException) as err:
        print(f"moeyard: config error: {compose_error_line(err, overrides)}", file=sys.stderr)
        return 2
    except ConfigError as err:
        print(f"moeyard: config error: {err}", file=sys.stderr)
        return 2
    try:
        config_path = write_resolved(cfg, Path(cfg.run.dir))
    except OSError as err:
        print(f"moeyard: run.dir={cfg.run.dir}: {err.strerror} (rule: must be a writable directory)", file=sys.stderr)
        return 2
    return launch(cfg, config_path)


def cmd_prepare(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="moeyard prepare", description="Tokenize text files into token files.")
    parser.add_argument("inputs", nargs="+", type=Path, help="text, .jsonl/.json or .parquet files, or directories")
    parser.add_argument("--out", type=Path, required=True, help="output directory (tokens.bin, meta.json)")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer.json or a directory with one (default: bytes)")
    parser.add_argument("--eos-token", help="document separator (default: the tokenizer's end-of-text token)")
    parser.add_argument(
        "--text-field", default="text", help="JSONL field or Parquet column holding the text (default: text)"
    )
    chat = parser.add_argument_group("chat rows (--chat; needs --tokenizer)")
    chat.add_argument("--chat", action="store_true", help="JSONL rows of messages, rendered with the chat template")
    chat.add_argument("--messages-field", default="messages", help="JSONL field holding the messages")
    chat.add_argument("--chat-template", type=Path, help="a Jinja template file (default: the tokenizer's own)")
    chat.add_argument("--loss-on", default="assistant", help="assistant (every turn), last (final turn) or all")
    chat.add_argument("--seq-len", type=int, help="rows longer than this many tokens are refused or cut")
    chat.add_argument("--long-rows", default="refuse", help="refuse (default) or cut rows longer than --seq-len")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.inputs if not p.exists()]
    if missing:
        print(f"moeyard prepare: inputs={missing} do not exist (rule: give existing files or dirs)", file=sys.stderr)
        return 2
    try:
        if args.chat:
            meta = _prepare_chat(args)
        else:
            meta = prepare(args.inputs, args.out, args.tokenizer, args.eos_token, args.text_field, progress=True)
    except OSError as err:
        rule = "inputs must be readable, --out a writable directory"
        print(f"moeyard prepare: {err.filename}: {err.strerror} (rule: {rule})", file=sys.stderr)
        return 2
    print(
        f"wrote {meta['num_tokens']} {meta['dtype']} tokens ({meta['documents']} documents) from {meta['files']} "
        f"files to {args.out} (tokenizer {meta['tokenizer']}, vocab_size {meta['vocab_size']})"
    )
    return 0


def _prepare_chat(args: argparse.Namespace) -> dict:
    """`moeyard prepare --chat`: prints what the loss mask keeps and what the long-row rule did."""
    if args.tokenizer is None:
        raise ValueError("--chat needs --tokenizer (rule: rows are rendered with that tokenizer's chat template)")
    opts = ChatOptions(
        messages_field=args.messages_field,
        loss_on=args.loss_on,
        seq_len=args.seq_len,
        long_rows=args.long_rows,
        template=args.chat_template,
    )
    meta = prepare_chat(args.inputs, args.out, args.tokenizer, opts, args.eos_token, progress=True)
    print(
        f"{meta['loss_tokens']} of {meta['num_tokens']} tokens in the loss (--loss-on {meta['loss_on']}); "
        f"longest row {meta['longest_row']} tokens, {meta['rows_cut']} rows cut"
    )
    return meta


def cmd_export(argv: list[str]) -> int:
    """`moeyard export RUN_DIR|CKPT --out DIR`."""
    parser = argparse.ArgumentParser(
        prog="moeyard export",
        description="Write a checkpoint as safetensors with a config.json of its Hugging Face family "
        "(Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3, GLM-4.5, gpt-oss or OLMoE).",
    )
    parser.add_argument("source", type=Path, help="a run directory (its latest checkpoint) or a step_N directory")
    parser.add_argument("--out", type=Path, required=True, help="new or empty output directory")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args(argv)
    path = export(args.source, args.out, args.dtype)
    architecture = json.loads((args.out / "config.json").read_text())["architectures"][0]
    print(f"exported {path} to {args.out} ({architecture}: safetensors + config.json)")
    return 0


def cmd_import(argv: list[str]) -> int:
    """`moeyard import HF_DIR [overrides]`: trains from Hugging Face weights, shaped by their config.json."""
    parser = argparse.ArgumentParser(
        prog="moeyard import",
        description="Start training from Hugging Face Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3 (FP8 too), "
        "Kimi-K2, GLM-4.5, gpt-oss (MXFP4 too) or OLMoE "
        "weights (sets model.*, moe.* and train.init_from=HF_DIR).",
    )
    parser.add_argument("hf_dir", type=Path, help="directory with config.json and safetensors")
    parser.add_argument("overrides", nargs="*", help="further Hydra overrides, e.g. train.steps=100")
    args = parser.parse_args(argv)
    hf = read_hf_config(args.hf_dir, "import")
    return cmd_train([*hydra_overrides(hf), f"train.init_from={args.hf_dir.resolve()}", *args.overrides])


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _run_config(ckpt_path: Path, command: str) -> JobConfig:
    """The resolved config.yaml of the run a checkpoint (RUN_DIR/checkpoints/step_N) belongs to."""
    path = ckpt_path.parent.parent / "config.yaml"
    if not path.is_file():
        rule = "a run directory written by `moeyard train` keeps its config beside checkpoints/"
        raise ValueError(f"{command}={ckpt_path}: no {path} (rule: {rule})")
    return load_resolved(path)


@dataclass(frozen=True)
class GenerationSource:
    """What `moeyard generate` reads, before any weights are: the model's shape, where its weights are (a
    resolved and verified checkpoint, or a Hugging Face directory) and its tokenizer."""

    model: ModelConfig
    moe: MoEConfig
    codec: Codec
    checkpoint: tuple[Path, dict] | None = None
    """The checkpoint's step_N directory and its meta.json."""
    hf_dir: Path | None = None

    def load_one_process(self) -> Transformer:
        if self.hf_dir is not None:
            return load_hf_model(self.hf_dir, self.model, self.moe, "generate", _device())
        return checkpoint_model(*self.checkpoint, "generate", _device())

    def request(self, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling) -> Request:
        """What the ranks of a layout generate (the job sets `result`)."""
        checkpoint = str(self.checkpoint[0]) if self.checkpoint else None
        hf_dir = str(self.hf_dir) if self.hf_dir else None
        return Request(
            checkpoint=checkpoint,
            hf_dir=hf_dir,
            prompt_ids=prompt_ids,
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            eos_id=self.codec.eos_id,
            result="",
        )


def _generation_source(source: Path, tokenizer: str | None) -> GenerationSource:
    """The model of a run directory (latest checkpoint), step_N or HF directory, and its tokenizer."""
    if is_hf_dir(source):
        if tokenizer is None and not (source / "tokenizer.json").is_file():
            rule = "give --tokenizer DIR (or bytes), or keep tokenizer.json in the model directory"
            raise ValueError(f"generate={source} has no tokenizer.json (rule: {rule})")
        cfg = compose(hydra_overrides(read_hf_config(source, "generate")))
        check_hf_dir(source, cfg.model, cfg.moe, "generate")
        return GenerationSource(cfg.model, cfg.moe, load_codec(tokenizer or source), hf_dir=source)
    path, meta = ckpt.resolve(str(source), source, "generate")
    if tokenizer is not None:
        codec = load_codec(tokenizer)
    else:
        cfg = _run_config(path, "generate")
        codec = codec_of_data(cfg.data, cfg.model.vocab_size)
    return GenerationSource(ModelConfig(**meta["model"]), MoEConfig(**meta["moe"]), codec, checkpoint=(path, meta))


def cmd_generate(argv: list[str]) -> int:
    """`moeyard generate SOURCE --prompt TEXT [LAYOUT ...]`: prints the model's continuation."""
    parser = argparse.ArgumentParser(
        prog="moeyard generate",
        description="Load a run's latest checkpoint (any layout) or a Hugging Face directory, into one process "
        "or resharded into the layout the overrides give, and print the continuation of a prompt (no KV "
        "cache: the prefix is recomputed for every token).",
    )
    parser.add_argument("source", type=Path, help="a run directory, a step_N directory or a Hugging Face directory")
    parser.add_argument(
        "overrides",
        nargs="*",
        help="the layout, as `moeyard train` takes it: parallel.*, launcher.* and train.device overrides, e.g. "
        "parallel.tp=2 parallel.ep=2 launcher.nproc_per_node=4 (default: one process)",
    )
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument("--chat", action="store_true", help="render the prompt as a user message (chat template)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="at most this many tokens (default 64)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: sample")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1: all tokens)")
    parser.add_argument("--seed", type=int, default=0, help="seeds sampling (default 0)")
    parser.add_argument(
        "--tokenizer", help="tokenizer.json or its directory, or bytes (default: the run's data tokenizer)"
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help='print {"tokens": [...], "text": ..., "layout": {world_size, pp, dp, tp, ep}}',
    )
    args = parser.parse_intermixed_args(argv)
    sampling = Sampling(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    sampling.check()
    src = _generation_source(args.source, args.tokenizer)
    codec = src.codec
    prompt_ids = codec.encode(codec.chat_prompt(args.prompt) if args.chat else args.prompt)
    check_prompt(prompt_ids, args.max_new_tokens, src.model, codec.name)
    job = None
    if args.overrides:
        try:
            job = layout_job(args.overrides, src.model, src.moe, len(prompt_ids) + args.max_new_tokens)
        except (HydraException, OmegaConfBaseException) as err:
            print(f"moeyard: config error: {compose_error_line(err, args.overrides)}", file=sys.stderr)
            return 2
    if job is not None and job.launcher.world_size() > 1:
        status, result = run_generation(job, src.request(prompt_ids, args.max_new_tokens, sampling))
        if result is None:  # the ranks failed (their launcher said why in one line), or launcher.dry_run
            return status
        new, layout = result["tokens"], result["layout"]
    else:
        model = src.load_one_process()
        device = next(model.parameters()).device
        new = generate(model, prompt_ids, args.max_new_tokens, sampling, codec.eos_id, device)
        layout = layout_of(ParallelDims(pp=1, dp=1, tp=1, ep=1, world_size=1))
    text = codec.decode(new[:-1] if new and new[-1] == codec.eos_id else new)
    print(json.dumps({"tokens": new, "text": text, "layout": layout}) if args.json else text)
    return 0


def cmd_eval(argv: list[str]) -> int:
    """`moeyard eval RUN_DIR [--data DIR]`: mean held-out loss and perplexity of the latest checkpoint."""
    parser = argparse.ArgumentParser(
        prog="moeyard eval",
        description="Mean loss and perplexity of a run's checkpoint on held-out token windows (the trainer's "
        "eval batches), in one process.",
    )
    parser.add_argument("source", type=Path, help="a run directory (its latest checkpoint) or a step_N directory")
    parser.add_argument("--data", help="a `moeyard prepare` directory (default: the run's own data)")
    parser.add_argument(
        "--split", default="val", help="val (default): the tail data.val_fraction holds out; all: every token of --data"
    )
    parser.add_argument("--batches", type=int, help="held-out batches (default: the run's train.eval_batches)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.split not in SPLITS:
        raise ValueError(f"--split={args.split} must be one of {', '.join(SPLITS)}")
    model, path, meta = load_checkpoint_model(args.source, "eval", _device())
    cfg = _run_config(path, "eval")
    data = held_out(cfg.data, args.data, args.split, cfg.train, model.cfg.vocab_size)
    batches = cfg.train.eval_batches if args.batches is None else args.batches
    result = {"checkpoint": str(path), "step": meta["step"], **evaluate(model, data, cfg.train, batches)}
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"eval {path} (step {result['step']}): loss {result['loss']:.4f}, perplexity {result['perplexity']:.3f} "
            f"over {batches} batches of {cfg.train.batch_size}x{cfg.train.seq_len} tokens"
        )
    return 0


COMMANDS = {
    "train": cmd_train,
    "prepare": cmd_prepare,
    "export": cmd_export,
    "import": cmd_import,
    "generate": cmd_generate,
    "eval": cmd_eval,
    "dashboard": cmd_dashboard,
    "plan": cmd_plan,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(
            "usage: moeyard {" + ",".join(COMMANDS) + "} [args]\n  moeyard train [hydra overrides]  e.g. "
            "model=debug train.steps=5 run.dir=runs/x",
            file=sys.stderr,
        )
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        return COMMANDS[argv[0]](argv[1:])
    except ValueError as err:  # bad files or values found after composition
        print(f"moeyard: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
