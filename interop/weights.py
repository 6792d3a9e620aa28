"""Weight loaders for a Hugging Face train.init_from, handed to the Trainer by the rank entry point."""

from __future__ import annotations

from pathlib import Path

from moeyard.interop.hf import load_hf_weights
from moeyard.interop.upcycle import is_dense_dir, load_upcycled_weights
from moeyard.train.checkpointing import WeightLoader, is_hf_dir
from moeyard.train.config import TrainerConfig


def loader_for(cfg: TrainerConfig) -> WeightLoader | None:
    """Reads train.init_from's weights into a built model when it names a Hugging Face directory, else None.

    A dense directory (train.upcycle; validation pairs the two) gives every expert the dense FFN.
    """
    init_from, model, moe = cfg.train.init_from, cfg.model, cfg.moe
    if not init_from or not is_hf_dir(init_from):
        return None
    path = Path(init_from)
    if is_dense_dir(path):
        return lambda pm: load_upcycled_weights(pm, path, model, moe, seed=cfg.train.seed)
    return lambda pm: load_hf_weights(pm, path, model)
