"""How every launcher starts a rank (`PYTHON -P -m moeyard.launch.rank`), and what a rank hands the trainer.

`-P` (Python 3.11+) keeps the working directory off sys.path, so a user's own `train.py`, `launch.py` or
`moeyard/` in the directory a job is launched from cannot stand in for MoEyard's modules.
"""

from __future__ import annotations

import sys

from moeyard.job.schema import JobConfig
from moeyard.train.checkpointing import WeightLoader, is_hf_dir

RANK_ARGS = ("-P", "-m", "moeyard.launch.rank")
GENERATE_ENV = "MOEYARD_GENERATE"
"""Set (to a request file) when the ranks generate rather than train (launch/generate_job.py)."""


def rank_command(python: str = sys.executable) -> list[str]:
    """The command line of one rank, run by `python`."""
    return [python, *RANK_ARGS]


def weight_loader(cfg: JobConfig) -> WeightLoader | None:
    """The Hugging Face weight loader when train.init_from names one; only then is the HF code imported."""
    if not (cfg.train.init_from and is_hf_dir(cfg.train.init_from)):
        return None
    from moeyard.interop.weights import loader_for  # kept off every other rank's import path

    return loader_for(cfg)
