"""The model presets and routing recipes of moe/presets.py as Hydra config-group options.

`model=<preset>` sets, at the root, the ModelConfig and MoEConfig fields the preset states; `moe=<recipe>`
sets every routing decision of the recipe (moe/presets.py says which). They live in Hydra's config store
rather than in conf/ so that the benchmarks, which run without Hydra, read the very same objects.
"""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

from moeyard.moe.presets import PRESETS, ROUTINGS


def register(store: ConfigStore | None = None) -> None:
    """Stores every preset in the `model` group and every recipe in the `moe` group."""
    store = store or ConfigStore.instance()
    for name, preset in PRESETS.items():
        node = {"model": dict(preset.model), "moe": preset.moe_fields()}
        store.store(group="model", name=name, node=node, package="_global_")
    for name, recipe in ROUTINGS.items():
        node = {} if name == "default" else recipe.decided()
        store.store(group="moe", name=name, node=node, package="moe")
