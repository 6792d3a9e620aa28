"""Helpers shared by the test modules (not a test module): the tiny configs, running `moeyard` and layouts on
gloo ranks (spawned, with their ports and environments, by the shipped train/spawn.py), and reading losses
back.

Every multi-rank launcher run is compared with one process training the same config (model=debug, 5 steps);
the reference is computed once per pytest session and cached under its base temp directory. `run_layout`
trains a config on `world` gloo ranks through torch.multiprocessing and returns rank 0's history and the
gathered parameters; by hand: `python -m tests.helpers OUT.pt WORLD key=value ...`.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.utils.flop_counter import FlopCounterMode

from moeyard.job.compose import compose
from moeyard.launch.entry import weight_loader
from moeyard.parallel.state import full_optimizer_state, full_state_dict
from moeyard.train.spawn import free_port, local_rank_env
from moeyard.train.spawn import spawn_ranks as spawn  # the shipped helper, under the name the tests use
from moeyard.train.trainer import Trainer

TINY = [
    "model=debug",
    "model.n_layers=2",
    "train.seq_len=32",
    "train.steps=6",
    "data.max_files=20",
    "profiling=off",
    "train.eval_every=0",
    "moe.bias_update_rate=0.01",
    "train.log_every=1",
]
"""A two-block debug model with aux-free bias on, for checkpoint and fault tests (every step logged)."""


def make_trainer(cfg, **kwargs) -> Trainer:
    """A Trainer as a rank builds one: with the Hugging Face weight loader when train.init_from names one."""
    return Trainer(cfg, load_weights=weight_loader(cfg), **kwargs)


def history_losses(history: list[dict]) -> list[float]:
    return [h["loss"] for h in history]


BASE = ["model=debug", "train.steps=5", "profiling.progress=false", "train.log_every=1"]
REPO = Path(__file__).resolve().parent.parent
MOEYARD = Path(sys.executable).with_name("moeyard")
"""The installed `moeyard` console script of the running (venv) python."""


def moeyard_cmd(*overrides: str) -> list[str]:
    """`moeyard train ...` through the running (venv) python, so ranks use that python too."""
    return [sys.executable, "-m", "moeyard.launch.cli", "train", *overrides]


def moeyard(*overrides: str, timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        moeyard_cmd(*overrides),
        cwd=REPO,
        env=env or dict(os.environ),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def job_report(out: subprocess.CompletedProcess, run_dir: Path, chars: int = 1500) -> str:
    """Why a launched job failed: the tails of its stderr, its stdout (where mpiexec reports a rank's signal)
    and every log under RUN_DIR/logs (ranks 1.., launcher.log with the held tracebacks)."""
    parts = [f"--- stderr\n{out.stderr[-chars:]}", f"--- stdout\n{out.stdout[-chars:]}"]
    logs = run_dir / "logs"
    for log in sorted(logs.iterdir()) if logs.is_dir() else ():
        parts.append(f"--- {log.name}\n{log.read_text(errors='replace')[-chars:]}")
    return "\n".join(parts)


def run_losses(run_dir: Path) -> list[float]:
    """The `loss` column of RUN_DIR/metrics.jsonl."""
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def reference_losses(tmp_path_factory: pytest.TempPathFactory) -> list[float]:
    """Losses of the single-process run of BASE (launcher=local, parallel=single), computed once."""
    run_dir = tmp_path_factory.getbasetemp() / "launch_reference"
    if not (run_dir / "metrics.jsonl").exists():
        out = moeyard(*BASE, f"run.dir={run_dir}", timeout=180)
        assert out.returncode == 0, out.stderr[-2000:]
    return run_losses(run_dir)


def assert_same_losses(got: list[float], want: list[float]) -> None:
    assert len(got) == len(want) == 5, (got, want)
    for step, (g, w) in enumerate(zip(got, want, strict=True), start=1):
        assert math.isclose(g, w, rel_tol=1e-5), f"step {step}: loss {g} != single-process {w}"


def layout_facts(trainer: Trainer) -> dict:
    """What this rank's model parts really are, for the golden tests to assert the layout was applied.

    params: name -> (kind, placements, local shape); kind is "dtensor" or "plain". ac: the block ids wrapped
    for activation checkpointing. fsdp: module names that FSDP2 manages. compiled: block ids compiled.
    dispatch: per MoE block, its dispatcher's class, overlap mode and chunks.
    stages: pipeline stage ids held; blocks: block ids held. numel: local parameter elements.
    """
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from moeyard.parallel.data_parallel import clean_fqn

    params, ac, fsdp, compiled, blocks, dispatch = {}, [], [], [], [], {}
    for part in trainer.pm.parts:
        for fqn, p in part.named_parameters():
            is_dt = isinstance(p, DTensor)
            local = p.to_local() if is_dt else p
            placements = tuple(str(x) for x in p.placements) if is_dt else ()
            mesh = tuple(p.device_mesh.mesh_dim_names or ()) if is_dt else ()
            params[clean_fqn(fqn)] = ("dtensor" if is_dt else "plain", placements, mesh, tuple(local.shape))
        for name, module in part.named_modules():
            if isinstance(module, FSDPModule):
                fsdp.append(clean_fqn(name) or "<root>")
        for lid, block in part.layers.items():
            blocks.append(int(lid))
            if hasattr(block, "_checkpoint_wrapped_module"):
                ac.append(int(lid))
            inner = getattr(block, "_checkpoint_wrapped_module", block)  # compiled inside the checkpoint
            if getattr(inner, "_compiled_call_impl", None) is not None:
                compiled.append(int(lid))
        for lid, moe in part.moe_layers().items():
            d = moe.dispatcher
            dispatch[int(lid)] = (type(d).__name__, getattr(d, "overlap", "-"), getattr(d, "chunks", 1))
    numel = sum(v[3] and torch.Size(v[3]).numel() for v in params.values())
    return {
        "params": params,
        "ac": sorted(ac),
        "fsdp": sorted(fsdp),
        "compiled": sorted(compiled),
        "dispatch": dispatch,
        "stages": list(trainer.pm.stage_ids),
        "blocks": sorted(blocks),
        "numel": numel,
    }


def _rank(rank: int, world: int, port: int, overrides: list[str], out: str) -> None:
    local_rank_env(rank, world, port)
    cfg = compose(["train.log_every=1", *overrides])  # every step's losses, for the comparisons
    trainer = make_trainer(cfg)
    initial = full_state_dict(trainer.pm)
    history = trainer.fit()
    state = full_state_dict(trainer.pm)
    optim = full_optimizer_state(trainer.pm, trainer.optimizer)
    facts = [layout_facts(trainer)]
    if dist.is_initialized():
        facts = [None] * world
        dist.all_gather_object(facts, layout_facts(trainer))
    if rank == 0:
        result = {"history": history, "state": state, "initial": initial, "optim": optim, "layout": facts}
        torch.save(result, out)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def run_layout(overrides: list[str], world: int, out: str, port: int) -> dict:
    """Trains `overrides` on `world` gloo ranks; returns from rank 0: history (metrics per step), state and
    initial (gathered parameters after and before training), optim (gathered AdamW state) and layout (one
    `layout_facts` per rank)."""
    spawn(_rank, (world, port, overrides, out), world)
    return torch.load(out, weights_only=True)


if __name__ == "__main__":
    result = run_layout(sys.argv[3:], int(sys.argv[2]), sys.argv[1], free_port())
    print([round(h["loss"], 6) for h in result["history"]])


def slice_only_safe_open(real, on_read):
    """A safe_open whose handles list names and hand out slices only (a whole-tensor read fails), calling
    `on_read(name, tensor)` for every slice read: for the tests that a rank reads only what it keeps."""

    class Slice:
        def __init__(self, inner, name: str) -> None:
            self.inner, self.name = inner, name

        def get_shape(self) -> list[int]:
            return self.inner.get_shape()

        def get_dtype(self) -> str:
            return self.inner.get_dtype()

        def __getitem__(self, box) -> torch.Tensor:
            t = self.inner[box]
            on_read(self.name, t)
            return t

    class Handle:
        def __init__(self, path: str, framework: str) -> None:
            self.inner = real(path, framework=framework)

        def __enter__(self):
            self.f = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def keys(self) -> list[str]:
            return self.f.keys()

        def get_slice(self, name: str) -> Slice:
            return Slice(self.f.get_slice(name), name)

    return Handle


def _mm_flops_of_dense_operands(a, b, *args, out_val=None, **kwargs) -> int:
    if a.layout != torch.strided or b.layout != torch.strided:
        return 0
    return 2 * a.shape[0] * a.shape[1] * b.shape[1]


_mm_flops_of_dense_operands._get_raw = True  # FlopCounterMode passes the tensors, not their shapes


def flop_counter(custom_mapping: dict | None = None) -> FlopCounterMode:
    """torch's FlopCounterMode (display off) counting a sparse-times-dense `mm` as 0: moe/combine.py's CPU
    combine is such a product, K multiply-adds per token row, elementwise work that the MFU formula leaves
    out as it leaves out the index_add the other paths use; counted as a dense [T, A] x [A, D] matmul it
    would be T times too much."""
    return FlopCounterMode(
        display=False, custom_mapping={torch.ops.aten.mm: _mm_flops_of_dense_operands, **(custom_mapping or {})}
    )
