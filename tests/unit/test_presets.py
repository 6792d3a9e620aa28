"""Presets are defined once and state only what differs from the defaults.

- every model preset and routing recipe composes to the values recorded before they moved from conf/ YAML
  to moe/presets.py (presets_before.json: `model=X` and `moe=Y` as composed then);
- the Python objects the benchmarks import equal what `model=X` composes;
- no YAML key in conf/ and no field of a preset or recipe restates its dataclass default;
- no preset or group file copies another's settings word for word (a preset names its recipe instead).

Run: .venv/bin/pytest -q tests/unit/test_presets.py
"""

from __future__ import annotations

import json
from dataclasses import MISSING, fields, is_dataclass
from itertools import permutations
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from moeyard.job.compose import as_dict, compose, conf_dir
from moeyard.job.schema import JobConfig
from moeyard.moe.config import ModelConfig, MoEConfig
from moeyard.moe.presets import PRESETS, ROUTING_DECISIONS, ROUTINGS, default_of
from tests.unit.test_config import leaves

BEFORE = json.loads((Path(__file__).with_name("presets_before.json")).read_text())


def schema_default(path: str):
    """The JobConfig default at a dotted path such as `launcher.np` (MISSING where it has none)."""
    node: object = JobConfig
    for name in path.split("."):
        if not is_dataclass(node):
            return MISSING
        spec = next((f for f in fields(node) if f.name == name), None)
        if spec is None:
            return MISSING
        has_factory = spec.default is MISSING and spec.default_factory is not MISSING
        node = spec.default_factory() if has_factory else spec.default
    return node


def yaml_settings(path: Path) -> dict[str, object]:
    """The root-level settings (dotted keys) a conf/ group file makes, its defaults list left out."""
    text = path.read_text()
    values = OmegaConf.to_container(OmegaConf.load(path)) or {}
    values.pop("defaults", None)
    if "@package _global_" not in text:
        values = {path.parent.name: values}
    return {key: tuple(v) if isinstance(v, list) else v for key, v in leaves(values)}


GROUP_FILES = sorted(p for p in conf_dir().glob("*/*.yaml"))


@pytest.mark.parametrize("case", sorted(BEFORE))
def test_preset_composes_as_before(case):
    got = as_dict(compose([case, "run.dir=unused"]))
    for section in ("model", "moe"):
        recorded = BEFORE[case][section]
        now = {key: got[section][key] for key in recorded}
        assert now == recorded, f"{case}: {section} changed"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_python_preset_is_what_hydra_composes(name):
    cfg = compose([f"model={name}", "run.dir=unused"])
    assert PRESETS[name].model_config() == cfg.model
    assert PRESETS[name].moe_config() == cfg.moe


@pytest.mark.parametrize("path", GROUP_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_yaml_key_differs_from_its_default(path):
    for key, value in yaml_settings(path).items():
        default = schema_default(key)
        assert default is not MISSING, f"{path.name}: {key} is not a field of the schema"
        assert value != default, f"{path.parent.name}/{path.name}: {key}={value} restates its dataclass default"


def test_presets_and_recipes_state_only_differences():
    for name, preset in PRESETS.items():
        for cls, stated in ((ModelConfig, preset.model), (MoEConfig, preset.moe)):
            for key, value in stated.items():
                assert value != default_of(cls, key), f"preset {name}: {key}={value} restates its default"
    for name, recipe in ROUTINGS.items():
        for key, value in recipe.moe.items():
            assert key in ROUTING_DECISIONS, f"recipe {name}: {key} is not a routing decision"
            assert value != default_of(MoEConfig, key), f"recipe {name}: {key}={value} restates its default"


def test_no_preset_copies_a_recipe():
    """A preset that routes by a recipe names it (`routing=`) rather than writing out its values."""
    for name, preset in PRESETS.items():
        for recipe_name, recipe in ROUTINGS.items():
            copied = recipe.moe and recipe.moe.items() <= preset.moe.items()
            assert not copied, f"preset {name} copies recipe {recipe_name}: set routing={recipe_name!r}"


def test_no_group_file_copies_another():
    settings = {f"{p.parent.name}/{p.name}": yaml_settings(p) for p in GROUP_FILES}
    settings |= {f"preset {n}": dict(leaves({"model": dict(p.model), "moe": dict(p.moe)})) for n, p in PRESETS.items()}
    for (a, sa), (b, sb) in permutations(settings.items(), 2):
        assert not (sa and sa.items() <= sb.items()), f"{b} copies every setting of {a}"
