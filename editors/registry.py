"""Weight editors by method name: the one place a name turns into a class. Callers never branch on it."""
from __future__ import annotations

import importlib
from dataclasses import fields

from memory.errors import ConfigError

# the editors as they were before the null-space defaults (docs/ice.md): the L-inf box alone
BOX = {"constraint": "box", "update_keys": "all", "lr": 7e-4, "norm_constraint": 0.011, "max_steps": 25}

# method -> (module, editor class, config class, settings over the config's defaults)
WEIGHT_EDITORS = {
    "ice": ("editors.ice", "ICEEditor", "ICEConfig", {}),
    "ftm": ("editors.ft", "FTEditor", "FTConfig", {}),
    "ice-box": ("editors.ice", "ICEEditor", "ICEConfig", BOX),
    "ftm-box": ("editors.ft", "FTEditor", "FTConfig", BOX),
}


def make_editor(method: str, model, tokenizer, **overrides):
    """Build the editor for `method` with its default config and preset, updated by any overrides."""
    if method not in WEIGHT_EDITORS:
        raise ConfigError(f"unknown edit method {method!r}: choose one of {', '.join(WEIGHT_EDITORS)}")
    module_name, editor_name, config_name, preset = WEIGHT_EDITORS[method]
    module = importlib.import_module(module_name)
    config_cls = getattr(module, config_name)
    known = {f.name for f in fields(config_cls)}
    unknown = set(overrides) - known
    if unknown:
        raise ConfigError(f"{method} has no setting(s) {', '.join(sorted(unknown))}")
    return getattr(module, editor_name)(model, tokenizer, config_cls(**{**preset, **overrides}))
