"""Packed forwards (editors/incomes/packing): the same numbers as the padded batch, with no padding."""
from __future__ import annotations

import pytest
import torch

from editors.incomes import compress_ids
from editors.incomes.compress import pad_rows
from editors.incomes.objective import _logits_at
from editors.incomes.packing import pack, packs
from tests.test_incomes import BUILDERS, FACTS, attached

# ragged rows, one longer than Gemma 3's sliding window (8), one of a single token
ROWS = [[5, 17, 42, 9, 77, 3, 61, 28, 90, 11, 7, 33], [12, 40, 41], [99], [60, 61, 62, 63, 64, 65, 66]]


def test_pack_drops_the_padding_and_restarts_positions():
    ids, mask = pad_rows(ROWS, 0, "cpu")
    packed = pack(ids, mask)
    assert packed.ids[0].tolist() == [t for row in ROWS for t in row]
    assert packed.position_ids[0].tolist() == [p for row in ROWS for p in range(len(row))]
    assert packed.columns(torch.tensor([1, 3]), torch.tensor([2, 0])).tolist() == [14, 16]
    assert int((packed.index >= 0).sum()) == sum(map(len, ROWS))  # padding maps to -1
    assert packs(mask) and not packs(torch.ones(4, 12))  # 23 of 48 slots are tokens; a full batch is not packed


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_packed_logits_equal_the_padded_batch_with_and_without_a_pool(arch):
    model = BUILDERS[arch]()
    addon = attached(model)
    with torch.no_grad():  # a non-zero gate, so the pool changes the logits
        for branch in addon.branches.values():
            if getattr(branch, "gate", None) is not None:
                branch.gate.fill_(1.0)
    gists = compress_ids(model, addon, FACTS)
    ids, mask = pad_rows(ROWS, 0, "cpu")
    rows = torch.tensor([r for r, row in enumerate(ROWS) for _ in row])  # every valid position
    cols = torch.tensor([c for row in ROWS for c in range(len(row))])
    outputs = []
    for pool in (None, gists):
        with torch.no_grad(), addon.use(pool):
            padded = model(input_ids=ids, attention_mask=mask).logits[rows, cols]  # [P, V]
            packed = _logits_at(model, ids, mask, rows, cols)  # [P, V]
        assert torch.allclose(padded, packed, atol=1e-5), (arch, pool is not None)
        outputs.append(packed)
    assert not torch.allclose(outputs[0], outputs[1], atol=1e-3)  # the pool was read
