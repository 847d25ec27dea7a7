"""Weight editors by method name: the one place a name turns into a class. Callers never branch on it."""
from __future__ import annotations

import importlib
from dataclasses import fields

from memory.errors import ConfigError

# method -> (module, editor class, config class)
WEIGHT_EDITORS = {
    "ice": ("editors.ice", "ICEEditor", "ICEConfig"),
    "ftm": ("editors.ft", "FTEditor", "FTConfig"),
}


def make_editor(method: str, model, tokenizer, **overrides):
    """Build the editor for `method` with its default config, updated by any overrides."""
    if method not in WEIGHT_EDITORS:
        raise ConfigError(f"unknown edit method {method!r}: choose one of {', '.join(WEIGHT_EDITORS)}")
    module_name, editor_name, config_name = WEIGHT_EDITORS[method]
    module = importlib.import_module(module_name)
    config_cls = getattr(module, config_name)
    known = {f.name for f in fields(config_cls)}
    unknown = set(overrides) - known
    if unknown:
        raise ConfigError(f"{method} has no setting(s) {', '.join(sorted(unknown))}")
    return getattr(module, editor_name)(model, tokenizer, config_cls(**overrides))
