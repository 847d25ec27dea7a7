"""Compression: each fact -> the K/V of its <GIST> token(s) in every upper layer (DESIGN §1.2).

One forward over `[fact tokens, <GIST> x gists_per_fact]` per fact, batched with right padding, or packed
into one row when the batch is mostly padding (editors/incomes/packing); either way each fact is compressed
independently.
Keys are kept before RoPE (after k_norm where the model has one), so a gist carries no position.
The forward runs the decoder only (no LM head), with no pool visible, and the compression-pass
adapters switched on.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from editors.incomes.introspect import GistHookError, find_layer_stack
from editors.incomes.packing import decoder_inputs
from memory.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompressedGists:
    """Gists of N facts: `keys`/`values` are [L, N, KVH, D] over the upper `layers`, in order."""

    layers: tuple[int, ...]
    keys: torch.Tensor
    values: torch.Tensor

    def __len__(self) -> int:
        return int(self.keys.shape[1])

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, V) of one upper layer, each [N, KVH, D]."""
        pos = self.layers.index(index)
        return self.keys[pos], self.values[pos]

    def select(self, rows: torch.Tensor | Sequence[int]) -> CompressedGists:
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.keys.device)
        return CompressedGists(self.layers, self.keys[:, rows], self.values[:, rows])

    @staticmethod
    def cat(parts: Sequence[CompressedGists]) -> CompressedGists:
        if not parts:
            raise ValueError("nothing to concatenate")
        return CompressedGists(parts[0].layers, torch.cat([p.keys for p in parts], dim=1),
                               torch.cat([p.values for p in parts], dim=1))


def add_gist_token(tokenizer, token: str = "<GIST>") -> int:
    """Add `token` to the tokenizer as a special token (idempotent); return its id.

    The model's embedding matrix is not resized: the add-on's gist embedding (initialised to the mean
    of the input rows) is put in place of the id's lookup by a hook, so the base weights, their
    shapes and the logits' width stay exactly as they were, and the model can never emit <GIST>
    (so no output row is needed, tied or untied).
    """
    if token not in tokenizer.get_vocab():
        tokenizer.add_tokens([token], special_tokens=True)
    token_id = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(token_id, int) or token_id < 0 or token_id == tokenizer.unk_token_id:
        raise ConfigError(f"tokenizer could not add the gist token {token!r}")
    return token_id


def pad_rows(rows: list[list[int]], pad_id: int, device, width: int | None = None):
    """Right-padded [B, T] ids and mask, built as one tensor (no per-row tensor ops)."""
    width = width or max(len(r) for r in rows)
    ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], dtype=torch.long)  # [B, T]
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], dtype=torch.long)  # [B, T]
    return ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)


def _pack(id_lists: Sequence[Sequence[int]], gist_id: int, pad_id: int, max_tokens: int, device, per_fact: int = 1):
    """Right-padded [B, T] ids and mask with `per_fact` <GIST> tokens appended to each row, and the gist
    columns, fact-major ([B * per_fact]: fact 0's gists, then fact 1's, ...)."""
    rows = []
    for ids in id_lists:
        ids = list(ids)
        if not ids:
            raise ConfigError("cannot compress an empty fact")
        if len(ids) > max_tokens - per_fact:
            log.warning("fact of %d tokens cut to %d before its <GIST>", len(ids), max_tokens - per_fact)
            ids = ids[: max_tokens - per_fact]
        rows.append(ids + [gist_id] * per_fact)
    input_ids, mask = pad_rows(rows, pad_id, device)  # [B, T]
    cols = torch.tensor([len(r) - per_fact + j for r in rows for j in range(per_fact)])  # [B * per_fact]
    return input_ids, mask, cols.to(device)


def compress_ids(model, addon, id_lists: Sequence[Sequence[int]], batch_size: int = 32,
                 max_tokens: int = 128, grad: bool = False, pad_id: int = 0) -> CompressedGists:
    """Compress tokenised facts (without the gist token) into gists, `batch_size` facts per forward.

    With grad=True the graph is kept, so the compression-pass adapters and the gist embedding train.
    """
    if not addon.attached or addon.gist_token_id is None:
        raise GistHookError("attach() the gist add-on before compressing")
    if batch_size < 1:
        raise ConfigError("batch_size must be >= 1")
    per_fact = addon.config.gists_per_fact
    if max_tokens <= per_fact:
        raise ConfigError(f"max_tokens {max_tokens} leaves no room for a fact before its {per_fact} gists")
    decoder, _ = find_layer_stack(model)
    device = addon.gist_embedding.device
    parts = []
    with torch.set_grad_enabled(grad):
        for start in range(0, len(id_lists), batch_size):
            chunk = id_lists[start:start + batch_size]
            input_ids, mask, cols = _pack(chunk, addon.gist_token_id, pad_id, max_tokens, device, per_fact)
            parts.append(_compress_batch(decoder, addon, input_ids, mask, cols, per_fact))
    if not parts:
        d = addon.dims
        empty = addon.gist_embedding.new_zeros(len(addon.layer_ids), 0, d.n_kv_heads * per_fact, d.head_dim)
        return CompressedGists(addon.layer_ids, empty, empty.clone())
    return CompressedGists.cat(parts)


def _compress_batch(decoder, addon, input_ids, mask, cols, per_fact: int = 1) -> CompressedGists:
    """The K/V at `cols` ([B * per_fact], fact-major) as gists [L, B, per_fact * KVH, D]: a fact's gists side
    by side in its row, as extra heads, so the pool keeps one row per fact whatever `per_fact` is."""
    rt = addon.runtime
    saved_pool = rt.pool
    inputs, locate = decoder_inputs(input_ids, mask)  # packed when mostly padding: each fact sees only itself
    rows = torch.arange(input_ids.shape[0], device=input_ids.device).repeat_interleave(per_fact)  # [B * per_fact]
    rt.pool, rt.capture_at = None, locate(rows, cols)  # no pool is read while compressing
    rt.captured.clear()
    try:
        decoder(**inputs, use_cache=False)
        missing = [i for i in addon.layer_ids if i not in rt.captured]
        if missing:
            raise GistHookError(f"compression captured no K/V in upper layers {missing}")
        n, d = input_ids.shape[0], addon.dims.head_dim
        keys = torch.stack([rt.captured[i][0].reshape(n, -1, d) for i in addon.layer_ids])  # [L, B, per*KVH, D]
        values = torch.stack([rt.captured[i][1].reshape(n, -1, d) for i in addon.layer_ids])  # [L, B, per*KVH, D]
    finally:
        rt.pool, rt.capture_at = saved_pool, None
        rt.captured.clear()
    return CompressedGists(addon.layer_ids, keys, values)


def compress_texts(model, tokenizer, addon, texts: Sequence[str], batch_size: int = 32,
                   max_tokens: int = 128, grad: bool = False) -> CompressedGists:
    """Compress fact texts (tokenised with the tokenizer's usual special tokens) into gists."""
    id_lists = [tokenizer(text)["input_ids"] for text in texts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return compress_ids(model, addon, id_lists, batch_size, max_tokens, grad, pad_id=pad)


@torch.no_grad()
def init_zero_keys_at_sink(model, addon, id_lists: list[list[int]], pad_id: int) -> None:
    """Set each upper layer's zero-gist key to the mean pre-RoPE key of position 0 over `id_lists`.

    Position 0 is the base model's attention sink (on SmolLM2 60-90% of an upper layer's attention from
    the last token goes there), and a pre-RoPE gist key is scored as if it sat at position 0. So the
    zero-gist starts as the sink: a query's gist attention starts mostly on "nothing", and a gist must
    earn its weight against it, which is what locality needs. Call it on an attached add-on."""
    device = addon.gist_embedding.device
    ids, mask = pad_rows([list(r) for r in id_lists], pad_id, device)  # [B, T]
    rows = torch.arange(ids.shape[0], device=device)  # [B]
    decoder, _ = find_layer_stack(model)
    was = addon.runtime.pool
    gists = _compress_batch(decoder, addon, ids, mask, torch.zeros_like(rows))  # K/V at column 0
    addon.runtime.pool = was
    for pos, layer in enumerate(addon.layer_ids):
        zero_key = addon.branches[str(layer)].zero_key  # [KVH, D]
        zero_key.copy_(gists.keys[pos].float().mean(dim=0).to(zero_key.dtype))
