"""One forward for a prefix that many prompts share (ICL puts the same facts block before every query).

Scoring N queries behind the same 1,200-token facts block costs N full forwards when each prompt runs on
its own; with the block's keys and values computed once, each query only runs its own few tokens against
them. Prompts are compared as **token ids**, not strings, so the result is the forward the full prompts
would get (up to float rounding): a shared string prefix whose last token merges across the boundary is
simply not shared past that token.
"""
from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from contextlib import contextmanager

import torch

MIN_SHARED_TOKENS = 32  # below this the saving does not pay for the extra forward


class _Reuse:
    on = False
    last: SharedPrefix | None = None


@contextmanager
def reuse_prefixes():
    """Inside, a new shared prefix is derived from the previous one when they start alike: cropped, or
    extended by its new tokens only (ICL's facts block grows by one line per learned fact, and retention
    scores every case behind the same block). Only for code that does not change the model's weights
    meanwhile: the cache is keyed by token ids, not by the weights."""
    outer = _Reuse.on
    _Reuse.on = True
    try:
        yield
    finally:
        _Reuse.on = outer
        if not outer:
            _Reuse.last = None


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
    return _cache_kwarg_of(type(model))


@functools.lru_cache(maxsize=None)
def _cache_kwarg_of(model_class) -> str:  # once per class, not per decoding step
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def cache_of(output):
    return output.cache if getattr(output, "cache", None) is not None else output.past_key_values


class SharedPrefix:
    """The keys and values of one prefix, handed out as a fresh cache per batch (forwards extend a cache)."""

    def __init__(self, model, prefix_ids: Sequence[int], kv: list | None = None):
        self.model, self.ids, self.length = model, list(prefix_ids), len(prefix_ids)
        self._kv = kv if kv is not None else self._run(list(prefix_ids), [])  # each [1, KVH, P, D]

    def _run(self, new_ids: list[int], kv: list) -> list:
        """The keys and values of `new_ids` appended after `kv` (an already computed start)."""
        from transformers.cache_utils import DynamicCache

        device = next(self.model.parameters()).device
        ids = torch.tensor([new_ids], device=device)  # [1, n]
        start = kv[0][0].shape[2] if kv else 0
        mask = torch.ones((1, start + len(new_ids)), dtype=torch.long, device=device)
        kwargs = {cache_kwarg(self.model): DynamicCache(ddp_cache_data=kv, config=self.model.config)} if kv else {}
        with torch.no_grad():
            out = self.model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1, **kwargs)
        return [(layer.keys, layer.values) for layer in cache_of(out).layers]

    def derive(self, prefix_ids: Sequence[int]) -> SharedPrefix | None:
        """The prefix `prefix_ids` built from this one (cropped to what they share, then extended by the
        rest), or None when they share fewer than MIN_SHARED_TOKENS."""
        ids = list(prefix_ids)
        common = common_prefix_length([self.ids, ids])
        if common < MIN_SHARED_TOKENS:
            return None
        kv = [(k[:, :, :common], v[:, :, :common]) for k, v in self._kv]
        if common < len(ids):
            kv = self._run(ids[common:], kv)
        return SharedPrefix(self.model, ids, kv)

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

    None when fewer than MIN_SHARED_TOKENS would be shared, or when there is one sequence and no earlier
    prefix to reuse (inside `reuse_prefixes`, one prompt behind the same facts block reuses it too).
    """
    if not sequences:
        return None
    last = _Reuse.last if _Reuse.on and _Reuse.last is not None and _Reuse.last.model is model else None
    if len(sequences) < 2 and last is None:
        return None
    length = min(common_prefix_length(sequences), max_length)
    if length < MIN_SHARED_TOKENS:
        return None
    ids = list(sequences[0][:length])
    prefix = last.derive(ids) if last is not None else None
    prefix = prefix or SharedPrefix(model, ids)
    if _Reuse.on:
        _Reuse.last = prefix
    return prefix
