"""`moeyard` command line: train, prepare (and the subcommands other modules register)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from launch.config import compose, write_resolved
from launch.validate import ConfigError, launcher_world_size, validate


def compose_error_line(err: Exception, overrides: list[str]) -> str:
    """One line naming the key, the value and the rule, from a Hydra/OmegaConf composition error."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

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


def cmd_train(overrides: list[str]) -> int:
    """Composes and validates the config once, writes it resolved, then starts the configured launcher."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = compose(overrides)
        validate(cfg, launcher_world_size(cfg))
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
    from launch.launchers import launch

    return launch(cfg, config_path)


def cmd_prepare(argv: list[str]) -> int:
    from launch.data import prepare

    parser = argparse.ArgumentParser(prog="moeyard prepare", description="Tokenize text files into token files.")
    parser.add_argument("inputs", nargs="+", type=Path, help="text files or directories")
    parser.add_argument("--out", type=Path, required=True, help="output directory (tokens.bin, meta.json)")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.inputs if not p.exists()]
    if missing:
        print(f"moeyard prepare: inputs={missing} do not exist (rule: give existing files or dirs)", file=sys.stderr)
        return 2
    try:
        meta = prepare(args.inputs, args.out)
    except OSError as err:
        rule = "inputs must be readable, --out a writable directory"
        print(f"moeyard prepare: {err.filename}: {err.strerror} (rule: {rule})", file=sys.stderr)
        return 2
    print(f"wrote {meta['num_tokens']} tokens from {meta['files']} files to {args.out}")
    return 0


def cmd_export(argv: list[str]) -> int:
    from launch.hf import cmd_export as run  # Hugging Face interop lives in launch/hf.py

    return run(argv)


def cmd_import(argv: list[str]) -> int:
    from launch.hf import cmd_import as run

    return run(argv)


def cmd_dashboard(argv: list[str]) -> int:
    """`moeyard dashboard RUN_DIR [--port P] [--host H] [--export FILE]` (profiling/dashboard.py)."""
    from profiling.dashboard import cmd_dashboard as dashboard

    return dashboard(argv)


COMMANDS = {
    "train": cmd_train,
    "prepare": cmd_prepare,
    "export": cmd_export,
    "import": cmd_import,
    "dashboard": cmd_dashboard,
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
