"""Find a decoder's layers, their attention modules and the model's dimensions, without model names.

What the gist hook relies on (checked here and by the contract test in tests/test_incomes.py):
- the decoder layers are one nn.ModuleList whose items each own one attention child with
  nn.Linear `q_proj`, `k_proj`, `v_proj`, `o_proj` and an int `head_dim` (Llama, Qwen2, Gemma3, ...);
- the attention is called with `hidden_states` and `position_embeddings=(cos, sin)` (transformers 5);
- `o_proj` is called once per forward on the per-head outputs `[B, T, n_heads * head_dim]`;
- the modeling module defines `apply_rotary_pos_emb(q, k, cos, sin)` used by the attention;
- an optional `q_norm` / `k_norm` (Gemma3) is applied to `[..., head_dim]` before RoPE.
"""
from __future__ import annotations

import inspect
import sys
from dataclasses import asdict, dataclass

import torch
from torch import nn

from editors.incomes.config import ATTENTION_PROJECTIONS
from memory.errors import EngramError


class GistHookError(EngramError):
    """The model does not expose the attention internals the gist hook relies on."""


@dataclass(frozen=True)
class ModelDims:
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden: int

    def to_dict(self) -> dict:
        return asdict(self)


def attention_of(layer: nn.Module) -> nn.Module | None:
    """The child of a decoder layer that is a q/k/v/o-projection attention, or None."""
    for child in layer.children():
        if all(isinstance(getattr(child, name, None), nn.Linear) for name in ATTENTION_PROJECTIONS):
            return child
    return None


def find_layer_stack(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """(decoder, layers): the longest ModuleList of attention-bearing layers, and the module owning it."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if all(attention_of(layer) is not None for layer in module):
                if best is None or len(module) > len(best[1]):
                    best = (name, module)
    if best is None:
        raise GistHookError(
            f"{type(model).__name__}: no list of decoder layers with q_proj/k_proj/v_proj/o_proj attention "
            "found (fused-qkv models are not supported by the gist hook)"
        )
    parent_name = best[0].rpartition(".")[0]
    decoder = model.get_submodule(parent_name) if parent_name else model
    return decoder, best[1]


def find_attentions(model: nn.Module) -> list[nn.Module]:
    """Every decoder layer's attention module, in layer order."""
    _, layers = find_layer_stack(model)
    return [attention_of(layer) for layer in layers]


def model_dims(model: nn.Module) -> ModelDims:
    attentions = find_attentions(model)
    first = attentions[0]
    head_dim = getattr(first, "head_dim", None)
    if not isinstance(head_dim, int):
        raise GistHookError(f"{type(first).__name__} has no int `head_dim` attribute")
    n_heads = first.q_proj.out_features // head_dim
    n_kv_heads = first.k_proj.out_features // head_dim
    if n_heads * head_dim != first.q_proj.out_features or n_heads % n_kv_heads:
        raise GistHookError(f"{type(first).__name__}: q_proj/k_proj widths do not match head_dim {head_dim}")
    return ModelDims(len(attentions), n_heads, n_kv_heads, head_dim, first.q_proj.in_features)


def rope_function(attention: nn.Module):
    """The `apply_rotary_pos_emb(q, k, cos, sin)` of the attention's own modeling module."""
    module = sys.modules.get(type(attention).__module__)
    fn = getattr(module, "apply_rotary_pos_emb", None)
    if fn is None or not callable(fn):
        raise GistHookError(
            f"{type(attention).__module__} defines no apply_rotary_pos_emb: the gist branch cannot apply "
            "RoPE to its queries as self-attention does (transformers internals changed?)"
        )
    return fn


def check_attention_signature(attention: nn.Module) -> None:
    """Fail loudly if the attention forward no longer takes the arguments the hook reads."""
    params = inspect.signature(type(attention).forward).parameters
    missing = [name for name in ("hidden_states", "position_embeddings") if name not in params]
    if missing:
        raise GistHookError(
            f"{type(attention).__name__}.forward has no parameter(s) {missing}; the gist hook reads them "
            "(transformers upgrade? the hook is written against transformers 5.x)"
        )


def split_call(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """(hidden_states, (cos, sin)) from an attention call, positional or keyword."""
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else (args[0] if args else None)
    if "position_embeddings" in kwargs:
        pos = kwargs["position_embeddings"]
    else:
        pos = args[1] if len(args) > 1 else None
    if not torch.is_tensor(hidden) or not isinstance(pos, (tuple, list)) or len(pos) != 2:
        raise GistHookError(
            "attention was called without hidden_states and position_embeddings=(cos, sin): the gist "
            "hook cannot compute RoPE queries (transformers internals changed?)"
        )
    return hidden, (pos[0], pos[1])
