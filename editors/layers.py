"""Find the MLP output projections that weight editors train, by looking at the model's structure.

No model-family names are matched. A decoder is taken to be the longest ModuleList of identical blocks;
in each block the MLP's output projection is the linear map from a wider space back to the residual
width (Llama/Qwen2/Gemma3 `mlp.down_proj`, GPT-2 `mlp.c_proj`). The ICE paper trains 5 consecutive
early layers (4-8 of Llama-2's 32), so the default window starts at the same relative depth.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from memory.errors import ConfigError

WINDOW_WIDTH = 5
WINDOW_START_FRACTION = 4 / 32  # the paper's Llama-2-7B window 4-8 of 32, as a fraction of depth
MLP_HINTS = ("mlp", "ffn", "feed_forward", "feedforward")  # submodule names, not model names


def _linear_dims(module: torch.nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a linear map, whichever convention its weight uses."""
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    weight = getattr(module, "weight", None)
    nf = getattr(module, "nf", None)  # GPT-2 Conv1D stores the weight as [in, out]
    if isinstance(weight, torch.nn.Parameter) and weight.dim() == 2 and nf == weight.shape[1]:
        return weight.shape[0], weight.shape[1]
    return None


def hidden_size(model: torch.nn.Module) -> int:
    """The residual-stream width, read from the input embedding rather than a config field name."""
    return model.get_input_embeddings().weight.shape[1]


def mlp_out_projection(block: torch.nn.Module, hidden: int) -> str | None:
    """Name (within `block`) of the MLP's output projection, or None when the block has none.

    Candidates map a wider input back to `hidden`. An attention output projection can also do so
    (Gemma3: heads * head_dim > hidden), so candidates under an MLP-named child win, then the widest."""
    best: tuple[bool, int, str] | None = None
    for name, module in block.named_modules():
        dims = _linear_dims(module)
        if dims is None or dims[1] != hidden or dims[0] <= hidden:
            continue
        in_mlp = any(hint in part.lower() for part in name.split(".") for hint in MLP_HINTS)
        key = (in_mlp, dims[0], name)
        if best is None or key[:2] > best[:2]:
            best = key
    return None if best is None else best[2]


def decoder_blocks(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The longest ModuleList of same-typed blocks that each hold an MLP output projection."""
    hidden = hidden_size(model)
    found: tuple[int, str, torch.nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) == 0:
            continue
        if len({type(block) for block in module}) != 1:
            continue
        if mlp_out_projection(module[0], hidden) is None:
            continue
        if found is None or len(module) > found[0]:
            found = (len(module), name, module)
    if found is None:
        raise ConfigError("cannot find the decoder blocks: no ModuleList of blocks with an MLP output projection")
    return found[1], found[2]


def default_window(n_layers: int, width: int = WINDOW_WIDTH) -> list[int]:
    """`width` consecutive layers starting at the paper's relative depth (layers 4-8 of 30 for SmolLM2)."""
    width = min(width, n_layers)
    start = min(round(n_layers * WINDOW_START_FRACTION), n_layers - width)
    return list(range(start, start + width))


def target_parameters(model: torch.nn.Module, layers: Sequence[int] | None = None) -> list[str]:
    """Parameter names of the MLP output-projection weights in `layers` (default: the early window)."""
    prefix, blocks = decoder_blocks(model)
    chosen = default_window(len(blocks)) if layers is None else list(layers)
    bad = [i for i in chosen if not 0 <= i < len(blocks)]
    if bad or not chosen:
        raise ConfigError(f"layers {chosen} are not a non-empty subset of 0..{len(blocks) - 1}")
    hidden = hidden_size(model)
    names = []
    for i in chosen:
        proj = mlp_out_projection(blocks[i], hidden)
        if proj is None:
            raise ConfigError(f"decoder block {i} has no MLP output projection")
        names.append(f"{prefix}.{i}.{proj}.weight")
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise ConfigError(f"expected parameters not found: {missing}")
    return names
