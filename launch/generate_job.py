"""`moeyard generate SOURCE --prompt TEXT parallel.*=... launcher.*=...`: generation in a given layout.

The overrides compose a job as `moeyard train` composes one (the same groups and launchers), but only the
layout's groups may be given: the model is the checkpoint's (its meta.json) or the Hugging Face config's.
Before any rank starts, the layout is checked against the model by the rules training uses (`check_layout`)
and the padding rule of sharded generation (interop/generate_ranks.py). The resolved config and the request
are written to a fresh directory, the job's launcher starts every rank there
(`python -P -m moeyard.launch.rank` with MOEYARD_GENERATE naming the request) and rank 0's tokens are read
back. The directory is removed when the ranks succeed and kept, with their logs, when they fail.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from moeyard.interop.generate_ranks import Request, pad_multiple, padded, padding_rule
from moeyard.job.compose import compose, write_resolved
from moeyard.job.layout import check_layout
from moeyard.job.schema import ConfigError, JobConfig
from moeyard.launch.entry import GENERATE_ENV
from moeyard.launch.launchers import launch
from moeyard.moe.config import ModelConfig, MoEConfig, check_fields
from moeyard.parallel.dims import ParallelDims

LAYOUT_GROUPS = ("parallel", "launcher")
"""The config groups a generation's overrides may set, besides `LAYOUT_KEYS`."""
LAYOUT_KEYS = ("train.device",)
"""Where the ranks run (e.g. cpu ranks on a machine with fewer GPUs than ranks)."""
LAUNCHERS = ("local", "torchrun", "mpi")
"""Launchers that start the ranks on this machine and wait for them (the tokens come back here)."""


def check_overrides(overrides: list[str]) -> None:
    for override in overrides:
        key = override.lstrip("+~").split("=", 1)[0]
        if key.split(".")[0] not in LAYOUT_GROUPS and key not in LAYOUT_KEYS:
            raise ConfigError(
                f"generate: {override} is not a layout override (rule: moeyard generate takes parallel.*, "
                "launcher.* and train.device overrides; the model is the checkpoint's)"
            )


def layout_job(overrides: list[str], model: ModelConfig, moe: MoEConfig, length: int) -> JobConfig:
    """The job the overrides compose, running `model`/`moe` on sequences of up to `length` tokens; raises
    ConfigError (one line) for a layout that does not fit them. Hydra's own errors pass through."""
    check_overrides(overrides)
    cfg = compose(overrides)
    cfg.model, cfg.moe = model, moe
    check_fields(cfg.launcher, "launcher.")
    check_fields(cfg.train, "train.")  # train.device
    lc, p = cfg.launcher, cfg.parallel
    if lc.name not in LAUNCHERS or lc.nodes_requested() > 1:
        where = f"launcher.name={lc.name}" if lc.name not in LAUNCHERS else f"{lc.nodes_field()}={lc.nnodes}"
        raise ConfigError(
            f"generate: {where} (rule: generation starts its ranks on this machine and waits for their tokens: "
            f"launcher {', '.join(LAUNCHERS)} on one node)"
        )
    try:
        dims = ParallelDims.from_config(p, lc.world_size())
    except ValueError as err:
        raise ConfigError(f"{err} ({lc.request()})") from None
    # One sequence, on every dp rank: the batch rules of check_layout (about training's micro-batches) are
    # met by stating that batch, so that only the model's rules speak.
    longest = padded(length, pad_multiple(model, p))
    batch = {"seq_len": longest, "batch_size": dims.dp * dims.pp, "micro_batches": dims.pp}
    cfg.train = dataclasses.replace(cfg.train, **batch)
    try:
        check_layout(cfg, dims)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    _check_generation(cfg, dims, length, longest)
    return cfg


def _check_generation(cfg: JobConfig, dims: ParallelDims, length: int, longest: int) -> None:
    """What sharded generation adds to the layout rules."""
    p, m = cfg.parallel, cfg.model
    rule = padding_rule(cfg.moe, p)
    if rule:
        raise ConfigError(f"generate: {rule}")
    if dims.cp > 1:
        raise ConfigError(f"generate: parallel.cp={dims.cp} (rule: generation runs parallel.cp=1)")
    if dims.pp > 1 and p.pp_stages_per_rank > 1:
        raise ConfigError(
            f"generate: parallel.pp_stages_per_rank={p.pp_stages_per_rank} (rule: generation runs one pipeline "
            "stage per rank)"
        )
    if longest > m.max_seq_len:
        raise ConfigError(
            f"generate: {length} tokens (prompt + --max-new-tokens), padded to {longest} for parallel.tp={p.tp}, "
            f"exceed model.max_seq_len={m.max_seq_len} (rule: ask for fewer new tokens)"
        )


@contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    """`name`=`value` in this process's environment (which the launcher hands the ranks) while inside."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


def run_generation(cfg: JobConfig, request: Request) -> tuple[int, dict | None]:
    """Starts the job's ranks on `request` (its `result` is set here); returns the exit status and rank 0's
    result, {"tokens": [...], "layout": {...}} (None when the ranks failed, and under launcher.dry_run, which
    prints the command and keeps the directory it names)."""
    job_dir = Path(tempfile.mkdtemp(prefix="moeyard-generate-"))
    cfg.run.dir = str(job_dir)
    # The launcher's stop line then says that a stopped generation saved nothing, which it never does.
    cfg.checkpoint = dataclasses.replace(cfg.checkpoint, enabled=False)
    config_path = write_resolved(cfg, job_dir)
    request = dataclasses.replace(request, result=str(job_dir / "tokens.json"))
    request.write(job_dir / "request.json")
    request_path = str(job_dir / "request.json")
    if cfg.launcher.dry_run:  # the launcher prints MOEYARD_CONFIG=... and the command: the request goes first
        print(f"{GENERATE_ENV}={shlex.quote(request_path)} ", end="")
    with _env(GENERATE_ENV, request_path):
        status = launch(cfg, config_path)
    if status or cfg.launcher.dry_run:
        return status, None
    result = json.loads(Path(request.result).read_text())
    shutil.rmtree(job_dir)
    return 0, result
