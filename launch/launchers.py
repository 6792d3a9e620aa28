"""Launchers: run the per-rank trainer here (local) or start ranks through torchrun.

Every rank gets the path of the resolved config.yaml in MOEYARD_CONFIG and reads it with `load_resolved`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from launch.config import JobConfig, load_resolved


def rank_main() -> int:
    """Body of every launched rank: read the resolved config and train."""
    from launch.trainer import train

    train(load_resolved(os.environ["MOEYARD_CONFIG"]))
    return 0


def torchrun_command(cfg: JobConfig, nnodes: int, nproc: int, node_rank: int | None = None) -> list[str]:
    lc = cfg.launcher
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc-per-node={nproc}",
           f"--max-restarts={lc.max_restarts}", "--rdzv-backend=c10d", f"--rdzv-endpoint={lc.rdzv_endpoint}",
           f"--rdzv-id={lc.rdzv_id}"]
    if node_rank is not None:
        cmd.append(f"--node-rank={node_rank}")
    return [*cmd, "-m", "launch.rank"]


def launch(cfg: JobConfig, config_path: Path) -> int:
    """Starts the configured launcher; returns its exit status."""
    env = {**os.environ, "MOEYARD_CONFIG": str(config_path.resolve())}
    lc = cfg.launcher
    if lc.name == "local" and lc.nproc_per_node == 1:
        os.environ["MOEYARD_CONFIG"] = env["MOEYARD_CONFIG"]
        return rank_main()
    if lc.name in ("local", "torchrun"):
        nnodes = lc.nnodes if lc.name == "torchrun" else 1
        return subprocess.call(torchrun_command(cfg, nnodes, lc.nproc_per_node), env=env)
    raise NotImplementedError(f"launcher.name={lc.name}")
