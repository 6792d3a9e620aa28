"""Composition of a job from `conf/` and the command line, and the resolved file every rank reads.

The dataclasses of job/schema.py are the Hydra schema, so a mistyped key or a value of the wrong type is an
error at composition time. `compose()` runs once, in the launching process; every rank reads the resolved
`config.yaml` it wrote into the run directory (composing per rank could disagree on timestamps).
"""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from moeyard.job.presets import register
from moeyard.job.schema import JobConfig

ConfigStore.instance().store(name="moeyard_schema", node=JobConfig)
register()  # the model presets and routing recipes of moe/presets.py: the `model` and `moe` groups


def conf_dir() -> Path:
    """The shipped `conf/` directory (installed as the package `moeyard.conf`)."""
    return Path(str(resources.files("moeyard.conf")))


def compose(overrides: list[str], config_name: str = "config") -> JobConfig:
    """Composes conf/ with command-line overrides into a typed, validated JobConfig."""
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        raw = hydra_compose(config_name=config_name, overrides=overrides)
    cfg: JobConfig = OmegaConf.to_object(raw)
    lc = cfg.launcher
    # Agents on several nodes would each make their own timestamped directory: validation asks for run.dir.
    if cfg.run.dir is None and not lc.runs_on_each_node():
        cfg.run.dir = f"runs/{time.strftime('%Y%m%d-%H%M%S')}-{cfg.model.name}"
    return cfg


def to_yaml(cfg: JobConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def write_resolved(cfg: JobConfig, run_dir: Path) -> Path:
    """Writes the resolved config atomically; every rank reads this file."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(to_yaml(cfg))
    tmp.replace(path)
    return path


def load_resolved(path: str | Path) -> JobConfig:
    """Reads a resolved config.yaml back into a typed JobConfig (checked against the schema)."""
    schema = OmegaConf.structured(JobConfig)
    return OmegaConf.to_object(OmegaConf.merge(schema, OmegaConf.load(path)))


def as_dict(cfg: JobConfig) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
