"""One forward for a prefix that many prompts share (ICL puts the same facts block before every query).

Scoring N queries behind the same 1,200-token facts block costs N full forwards when each prompt runs on
its own; with the block's keys and values computed once, each query only runs its own few tokens against
them. Prompts are compared as **token ids**, not strings, so the result is the forward the full prompts
would get (up to float rounding): a shared string prefix whose last token merges across the boundary is
simply not shared past that token.
"""
from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch

MIN_SHARED_TOKENS = 32  # below this the saving does not pay for the extra forward


def common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """The number of leading token ids every sequence has in common."""
    if not sequences:
        return 0
    n = min(len(s) for s in sequences)
    first = sequences[0]
    for other in sequences[1:]:
        k = 0
        while k < n and other[k] == first[k]:
            k += 1
        n = k
    return n


def cache_kwarg(model) -> str:
    """transformers 5.2x renamed the forward's `past_key_values` to `cache`; use what this version takes."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def cache_of(output):
    return output.cache if getattr(output, "cache", None) is not None else output.past_key_values


class SharedPrefix:
    """The keys and values of one prefix, handed out as a fresh cache per batch (forwards extend a cache)."""

    def __init__(self, model, prefix_ids: Sequence[int]):
        self.model, self.length = model, len(prefix_ids)
        device = next(model.parameters()).device
        ids = torch.tensor([list(prefix_ids)], device=device)  # [1, P]
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
        cache = cache_of(out)
        self._kv = [(layer.keys, layer.values) for layer in cache.layers]  # each [1, KVH, P, D]
        self.last_logits = out.logits[0, -1]  # [V]: predicts the first token after the prefix

    def cache_for(self, batch: int):
        from transformers.cache_utils import DynamicCache

        expanded = [(k.expand(batch, -1, -1, -1).contiguous(), v.expand(batch, -1, -1, -1).contiguous())
                    for k, v in self._kv]
        return DynamicCache(ddp_cache_data=expanded, config=self.model.config)

    def forward(self, suffix_ids: torch.Tensor, suffix_mask: torch.Tensor, position_ids: torch.Tensor | None = None,
                cache=None):
        """The model on [prefix | suffix] with the prefix from the cache. Returns the output (cache inside)."""
        batch = suffix_ids.shape[0]
        prefix_mask = torch.ones((batch, self.length), dtype=suffix_mask.dtype, device=suffix_mask.device)
        kwargs = {cache_kwarg(self.model): cache if cache is not None else self.cache_for(batch)}
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        return self.model(input_ids=suffix_ids, attention_mask=torch.cat([prefix_mask, suffix_mask], dim=1),
                          use_cache=True, **kwargs)


def shared_prefix_for(model, sequences: Sequence[Sequence[int]], max_length: int) -> SharedPrefix | None:
    """A SharedPrefix for the tokens all `sequences` share, at most `max_length` of them.

    None when fewer than MIN_SHARED_TOKENS would be shared (or there is only one sequence to run).
    """
    if len(sequences) < 2:
        return None
    length = min(common_prefix_length(sequences), max_length)
    if length < MIN_SHARED_TOKENS:
        return None
    return SharedPrefix(model, sequences[0][:length])
