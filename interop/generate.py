"""`moeyard generate`: a look at the model. Loads a run's checkpoint (saved under any layout) or a Hugging Face
directory into one process and samples a continuation: greedy, or temperature with nucleus (top-p) sampling.

There is no KV cache: every new token runs the whole prefix through the model again, so a continuation of N
tokens costs N forwards of up to prompt + N tokens. That is quadratic, and fine for looking at a model; it keeps
the model code untouched (the same `Transformer.forward` that trains) and the logits exactly those of a forward
over the whole sequence. Logits are read in fp32; sampling runs on the host with a seeded `torch.Generator`, so
a seed gives the same tokens on every machine for the same logits.

Weights come the ways `moeyard export` and `moeyard import` read them: a checkpoint through DCP, resharded into
one process (`parallel.checkpoint.load`), and an HF directory through `interop.hf.load_hf_weights`. Given a
layout, several ranks run the same loop (`sample_loop`) on the model sharded their way: interop/generate_ranks.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import tokenizers
import torch

from moeyard.interop.chat import ChatTemplate
from moeyard.interop.hf import check_hf_dir, load_hf_weights
from moeyard.interop.prepare import load_tokenizer
from moeyard.moe.config import ModelConfig, MoEConfig
from moeyard.moe.experts import choose_expert_path
from moeyard.moe.model import Transformer
from moeyard.parallel import checkpoint as ckpt
from moeyard.parallel.config import ParallelConfig
from moeyard.parallel.dims import ParallelDims
from moeyard.parallel.parallelize import ParallelModel, build_parallel_model
from moeyard.train.data import EOS, TOKENIZER, DataConfig, decode, encode, read_token_dir

# --- loading the model into one process -------------------------------------------------------------------


def one_process_model(m: ModelConfig, e: MoEConfig, device: torch.device) -> ParallelModel:
    """The model as one process of a training run holds it, allocated but not filled (a load fills it)."""
    pcfg = ParallelConfig()
    dims = ParallelDims.from_config(pcfg, 1)
    pm = build_parallel_model(m, e, pcfg, dims, None, None, device, seed=0, init=False)
    choose_expert_path([moe.experts for moe in pm.moe_layers().values()], "auto", device, torch.float32)
    pm.train(False)
    return pm


def load_checkpoint_model(source: Path, field: str, device: torch.device) -> tuple[Transformer, Path, dict]:
    """The checkpoint `source` names (a run directory's latest, or a step_N directory), whatever layout saved it,
    with its path and meta.json. Raises CheckpointError (a ValueError, one line) for an unusable checkpoint."""
    path, meta = ckpt.resolve(str(source), source, field)
    return checkpoint_model(path, meta, field, device), path, meta


def checkpoint_model(path: Path, meta: dict, field: str, device: torch.device) -> Transformer:
    """The complete checkpoint at `path` (its meta.json read by `ckpt.resolve`), resharded into one process."""
    pm = one_process_model(ModelConfig(**meta["model"]), MoEConfig(**meta["moe"]), device)
    ckpt.load(pm, None, path, meta, field, weights_only=True)
    return pm.parts[0]


def load_hf_model(hf_dir: Path, m: ModelConfig, e: MoEConfig, field: str, device: torch.device) -> Transformer:
    """The Hugging Face model in `hf_dir`, whose config `moeyard import` turned into `m` and `e`."""
    check_hf_dir(hf_dir, m, e, field)
    pm = one_process_model(m, e, device)
    load_hf_weights(pm, hf_dir, m)
    return pm.parts[0]


# --- tokenizers ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Codec:
    """Text <-> token ids for generation, with the separator (where generation stops) and the chat template."""

    name: str
    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    eos_id: int
    folder: Path | None = None
    """The tokenizer's folder, where its chat template lives; None for the byte tokenizer (no template)."""

    def chat_prompt(self, text: str) -> str:
        """`text` as one user message rendered with the tokenizer's chat template, ready for the answer."""
        if self.folder is None:
            raise ValueError(
                f"--chat with tokenizer {self.name} (rule: --chat needs a tokenizer.json whose folder has a chat "
                "template; give --tokenizer DIR)"
            )
        return ChatTemplate.load(self.folder).render([{"role": "user", "content": text}], add_generation_prompt=True)


BYTES = Codec(name=TOKENIZER, encode=lambda text: encode(text).tolist(), decode=decode, eos_id=EOS)


def load_codec(spec: str | Path) -> Codec:
    """`bytes`, or a tokenizer.json (or a folder with one): encoded without added special tokens, as
    `moeyard prepare` encodes training text (a chat template writes its own)."""
    if str(spec) == TOKENIZER:
        return BYTES
    tok = load_tokenizer(Path(spec))
    file = Path(tok.identity["tokenizer_path"])
    hf = tokenizers.Tokenizer.from_file(str(file))
    hf.no_truncation()
    return Codec(
        name=tok.identity["tokenizer"],
        encode=lambda text: hf.encode(text, add_special_tokens=False).ids,
        decode=lambda ids: hf.decode(ids, skip_special_tokens=True),
        eos_id=tok.eos_id,
        folder=file.parent,
    )


def codec_of_data(data: DataConfig, vocab_size: int) -> Codec:
    """The tokenizer a run's data was prepared with: bytes for the stdlib corpus, else what the (first) token
    directory's meta.json records."""
    if data.source == "stdlib":
        return BYTES
    path = data.path if data.source == "tokens" else data.blend[0].path
    meta = read_token_dir(path, vocab_size)[1]
    if meta.get("tokenizer", TOKENIZER) == TOKENIZER:
        return BYTES
    file = meta.get("tokenizer_path")
    if not file or not Path(file).is_file():
        raise ValueError(
            f"data.path={path}: its tokenizer {meta.get('tokenizer')} is no longer at {file} "
            "(rule: give --tokenizer DIR, the tokenizer the data was prepared with)"
        )
    return load_codec(Path(file))


# --- sampling -----------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Sampling:
    """How the next token is picked."""

    temperature: float = 0.0
    """0: greedy (the most likely token); > 0: sample from softmax(logits / temperature)."""
    top_p: float = 1.0
    """Nucleus: sample only from the most likely tokens whose probabilities sum to top_p (1: all)."""
    seed: int = 0
    """Seeds the sampling generator (ignored when greedy)."""

    def check(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"--temperature={self.temperature} must be >= 0 (rule: 0 is greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p={self.top_p} must be in (0, 1]")


def nucleus(probs_V: torch.Tensor, top_p: float) -> torch.Tensor:
    """`probs_V` [V] cut to the nucleus and renormalised: the most likely tokens, in order, until their mass
    reaches `top_p` (a token stays while the mass of the tokens before it is < top_p; the first always
    stays). The set transformers' top-p warper keeps."""
    sorted_V, order_V = probs_V.sort(descending=True)
    before_V = sorted_V.cumsum(0) - sorted_V
    kept_V = torch.zeros_like(probs_V).scatter(0, order_V, torch.where(before_V < top_p, sorted_V, 0.0))
    return kept_V / kept_V.sum()


def pick(logits_V: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """The next token from the last position's logits [V]."""
    logits_V = logits_V.float().cpu()
    if sampling.temperature == 0:
        return int(logits_V.argmax())
    probs_V = nucleus(torch.softmax(logits_V / sampling.temperature, dim=0), sampling.top_p)
    return int(torch.multinomial(probs_V, 1, generator=generator))


@torch.no_grad()
def generate(
    model: Callable[[torch.Tensor], torch.Tensor],
    prompt_ids: list[int],
    max_new_tokens: int,
    sampling: Sampling = Sampling(),  # noqa: B008 - frozen, so a shared default is safe
    eos_id: int | None = None,
    device: torch.device | str = "cpu",
) -> list[int]:
    """Up to `max_new_tokens` tokens after `prompt_ids`, stopping after `eos_id` (included) when it comes.

    `model`: token ids [1, S] int64 -> logits [1, S, V] (a `Transformer`). No KV cache: the whole prefix is
    run again for every token (see the module doc).
    """

    def last_logits(ids: list[int]) -> torch.Tensor:
        logits_1SV = model(torch.tensor([ids], dtype=torch.int64, device=device))
        _drain(model)
        return logits_1SV[0, -1]

    return sample_loop(last_logits, prompt_ids, max_new_tokens, sampling, eos_id)


def sample_loop(
    last_logits: Callable[[list[int]], torch.Tensor | None],
    prompt_ids: list[int],
    max_new_tokens: int,
    sampling: Sampling,
    eos_id: int | None,
    agree: Callable[[int | None], int] = lambda token: token,
) -> list[int]:
    """The loop of `generate`, for one process or many: `last_logits(ids)` gives the last position's logits
    [V] on the process that picks (None elsewhere); `agree(token)` returns the picked token on every process
    (one process: itself), so that every rank feeds the same sequence to its next forward."""
    sampling.check()
    generator = torch.Generator().manual_seed(sampling.seed)
    ids = list(prompt_ids)
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits_V = last_logits(ids)
        token = agree(None if logits_V is None else pick(logits_V, sampling, generator))
        ids.append(token)
        new.append(token)
        if token == eos_id:
            break
    return new


def _drain(model: object) -> None:
    """Drops the routing statistics each MoE layer keeps per forward (a trainer reads them; nothing here does)."""
    for moe in getattr(model, "moe_layers", dict)().values():
        moe.drain_stats()


def check_prompt(prompt_ids: list[int], max_new_tokens: int, m: ModelConfig, tokenizer: str) -> None:
    """The prompt's ids must fit the embedding, and the prompt and its continuation the model's positions."""
    if not prompt_ids:
        raise ValueError("--prompt is empty (rule: give at least one token of text)")
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens={max_new_tokens} must be >= 1")
    if max(prompt_ids) >= m.vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer} gives token id {max(prompt_ids)}, past model.vocab_size={m.vocab_size} "
            "(rule: the tokenizer the model was trained with)"
        )
    if len(prompt_ids) + max_new_tokens > m.max_seq_len:
        raise ValueError(
            f"--max-new-tokens={max_new_tokens}: the prompt's {len(prompt_ids)} tokens plus the continuation "
            f"exceed model.max_seq_len={m.max_seq_len} (rule: prompt + new tokens <= the model's positions)"
        )
