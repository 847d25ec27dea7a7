"""Packed forwards: a right-padded batch run as one row with no padding (training, the held-out check and
compression, when the batch is mostly padding).

A training step's batches are ragged (a teacher row carries its fact, a query may carry a continuation), so
about half of a padded [B, T] batch is padding, and the decoder's cost goes with B * T. Packed, the valid
tokens of all rows form one sequence whose position ids restart at 0 for each row; transformers then builds
a block-causal mask (one causal block per row; masking_utils.find_packed_sequence_indices), so each row
sees only itself, at the positions it had in the padded batch: the same computation as padded, without
the padding. The gist hooks work per position, so the student and the compression pass can be packed too;
only rows that read the pool after an inline <GIST> cannot (the hooks find a row's last <GIST>), and
training, the held-out check and compression never have those.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PackedBatch:
    """`ids` and `position_ids` [1, N] (N valid tokens, row after row); `index` [B, T] maps a padded
    (row, column) to its packed column, -1 at padding."""

    ids: torch.Tensor
    position_ids: torch.Tensor
    index: torch.Tensor

    def columns(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Packed columns [P] of padded positions (rows, cols), which must be valid tokens."""
        return self.index[rows, cols]


def pack(ids: torch.Tensor, mask: torch.Tensor) -> PackedBatch:
    """Pack a right-padded batch (ids, mask [B, T]): each row's valid tokens must come first."""
    valid = mask.bool()  # [B, T]
    index = torch.where(valid, valid.flatten().long().cumsum(0).view_as(valid) - 1, -1)  # [B, T], no host sync
    positions = mask.long().cumsum(dim=-1) - 1  # [B, T], 0 at each row's first token
    return PackedBatch(ids[valid][None], positions[valid][None], index)


PACK_BELOW = 0.7
"""Pack a batch only when under this share of its slots are tokens. Measured on this project's CPU
(100 facts compressed 32 at a time): with little padding a packed forward is 4-13% slower (one block-causal
mask over the whole row costs more than what it saves); a training step's batches, about 40-50% tokens,
run 1.5× faster packed."""


def packs(mask: torch.Tensor) -> bool:
    """Whether a right-padded batch (mask [B, T]) is worth packing (see PACK_BELOW)."""
    return mask.numel() > 0 and int(mask.sum()) < PACK_BELOW * mask.numel()


def decoder_inputs(ids: torch.Tensor, mask: torch.Tensor):
    """(the decoder's keyword inputs, a map from padded (rows, cols) to those of its output): packed when
    `packs(mask)`, else the padded batch as it is."""
    if not packs(mask):
        return {"input_ids": ids, "attention_mask": mask}, lambda rows, cols: (rows, cols)
    packed = pack(ids, mask)
    inputs = {"input_ids": packed.ids, "position_ids": packed.position_ids, "attention_mask": None}
    return inputs, lambda rows, cols: (torch.zeros_like(rows), packed.columns(rows, cols))


def hidden_at(decoder, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor,
              cols: torch.Tensor) -> torch.Tensor:
    """The decoder's last hidden states [P, C] at padded positions (rows, cols), packed when worth it."""
    inputs, locate = decoder_inputs(ids, mask)
    hidden = decoder(**inputs, use_cache=False).last_hidden_state  # [B, T, C] or [1, N, C]
    return hidden[locate(rows, cols)]  # [P, C]
