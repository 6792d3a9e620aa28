"""`moeyard` command line: train, prepare (and the subcommands other modules register)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from launch.config import compose, write_resolved
from launch.validate import ConfigError, launcher_world_size, validate


def cmd_train(overrides: list[str]) -> int:
    """Composes and validates the config once, writes it resolved, then starts the configured launcher."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = compose(overrides)
        validate(cfg, launcher_world_size(cfg))
    except (HydraException, OmegaConfBaseException) as err:
        print(f"moeyard: config error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except ConfigError as err:
        print(f"moeyard: config error: {err}", file=sys.stderr)
        return 2
    config_path = write_resolved(cfg, Path(cfg.run.dir))
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
    meta = prepare(args.inputs, args.out)
    print(f"wrote {meta['num_tokens']} tokens from {meta['files']} files to {args.out}")
    return 0


COMMANDS = {"train": cmd_train, "prepare": cmd_prepare}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: moeyard {" + ",".join(COMMANDS) + "} [args]\n  moeyard train [hydra overrides]  e.g. "
              "model=debug train.steps=5 run.dir=runs/x", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        return COMMANDS[argv[0]](argv[1:])
    except ValueError as err:  # bad files or values found after composition
        print(f"moeyard: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
