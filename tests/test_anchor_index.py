"""The mention gate's anchor index, and the gathered read: the gist branch attends over the rows a query may
read, and answers as if the pool held only those rows."""
from __future__ import annotations

import random

import pytest
import torch

from editors.incomes.anchor_index import AnchorIndex
from editors.incomes.compress import CompressedGists
from editors.incomes.pool import GistPool


def brute_force(tokens: list[int], anchors: dict[int, list[list[int]]], start: int = 0) -> set[int]:
    text = "".join(map(chr, tokens))
    return {row for row, forms in anchors.items() for a in forms
            if any(text.startswith("".join(map(chr, a)), i) for i in range(start, len(tokens)))}


def test_the_index_finds_exactly_the_rows_a_substring_scan_finds():
    rng = random.Random(0)
    anchors = {row: [[rng.randrange(12) for _ in range(rng.randint(1, 4))] for _ in range(rng.randint(1, 3))]
               for row in range(300)}
    index = AnchorIndex()
    for row, forms in anchors.items():
        index.add(row, forms)
    assert index.longest == 4 and len(index) == 300
    for _ in range(200):
        tokens = [rng.randrange(14) for _ in range(rng.randint(0, 20))]
        start = rng.randint(0, 5)
        assert index.mentioned(tokens, start) == brute_force(tokens, anchors, start)
    for row in range(0, 300, 2):  # removal leaves the other rows' anchors, shared prefixes included
        index.remove(row)
        del anchors[row]
    index.remove(12345)  # an unknown row: nothing to do
    for _ in range(100):
        tokens = [rng.randrange(14) for _ in range(rng.randint(0, 20))]
        assert index.mentioned(tokens) == brute_force(tokens, anchors)
    index.add(1, [])  # re-adding with no anchors un-indexes it
    assert 1 not in index


def test_a_pool_keeps_its_index_in_step_with_appends_and_removals():
    pool = GistPool([0], 1, 2)
    gists = lambda n: CompressedGists((0,), torch.randn(1, n, 1, 2), torch.randn(1, n, 1, 2))  # noqa: E731
    pool.append([10, 11, 12], gists(3), anchors=[[[5, 6]], [], [[7]]])
    pool.remove(10)
    pool.append([13], gists(1), anchors=[[[5, 6]]])
    parts = pool.view().bound_parts()
    assert parts["row_of"] == {11: 0, 12: 1, 13: 2} and parts["unanchored"] == [0]
    assert parts["index"].mentioned([1, 5, 6, 7]) == {12, 13}


@pytest.fixture(scope="module")
def memory():
    from editors.incomes.memory import GistMemory
    from editors.incomes.modules import GistAddon
    from editors.model import tiny_tokenizer
    from tests.test_editors import tiny

    torch.manual_seed(0)
    model = tiny()
    mem = GistMemory(model, tiny_tokenizer(), GistAddon.for_model(model))
    yield mem
    mem.close()


def test_the_gathered_read_answers_as_a_pool_of_the_readable_rows_alone(memory):
    subjects = [f"Zq{chr(97 + i)}{chr(97 + j)}" for i in range(6) for j in range(5)]  # 30 subjects
    statements = [f"{s} lives in town {i}." for i, s in enumerate(subjects)]
    memory.add(list(range(30)), statements, subjects=subjects)
    memory.add([100, 101], ["The sky is green.", "Water is dry."])  # no subject: read by every query
    query = memory.tokenizer(f"Where does {subjects[7]} live? And {subjects[21]}?", return_tensors="pt")
    with memory.reading(), torch.no_grad():
        whole = memory.model(**query).logits
        runtime = memory.addon.runtime
        gathered = runtime.rows.tolist()
    assert gathered == [7, 21, 30, 31]  # the mentioned rows and the two without a subject, nothing else
    everything = memory.pool
    alone = GistPool.for_addon(memory.addon)
    view = everything.view_all()
    keep = [7, 21, 30, 31]
    alone.append([view.fact_ids[i] for i in keep],
                 CompressedGists(view.layers, view.keys[:, keep], view.values[:, keep]),
                 anchors=[list(view.anchors[i]) for i in keep])
    memory.pool = alone
    try:
        with memory.reading(), torch.no_grad():
            small = memory.model(**query).logits
            assert memory.addon.runtime.rows is None  # all four readable: nothing to gather or mask
    finally:
        memory.pool = everything
    assert torch.allclose(whole, small, atol=1e-5)


def test_rows_live_in_blocks_that_appends_and_removals_never_copy_whole(monkeypatch):
    from editors.incomes import blocks

    monkeypatch.setattr(blocks, "BLOCK", 4)
    rows = blocks.RowBlocks(2, 1, 3, torch.device("cpu"), torch.float32)
    reference = torch.randn(2, 11, 1, 3)
    rows.append(reference[:, :3], reference[:, :3] + 1)
    first = rows.snapshot()
    rows.append(reference[:, 3:11], reference[:, 3:11] + 1)  # fills block 0, then blocks 1 and 2
    assert rows.snapshot().used == (4, 4, 3)
    assert rows.snapshot().keys[0].data_ptr() == first.keys[0].data_ptr()  # filled in place, not regrown
    assert torch.equal(first.whole()[0], reference[:, :3])  # an older snapshot still reads its own rows
    keep = [i for i in range(11) if i != 5]
    untouched = rows.snapshot().keys[2].data_ptr()
    before_removal = rows.snapshot()
    rows.remove(5)  # rewrites block 1 alone
    now = rows.snapshot()
    assert now.used == (4, 3, 3) and now.keys[2].data_ptr() == untouched
    assert torch.equal(now.whole()[0], reference[:, keep]) and torch.equal(now.whole()[1], reference[:, keep] + 1)
    assert torch.equal(before_removal.whole()[0], reference)  # views handed out before keep their rows
    pick = [0, 3, 4, 7, 9]
    assert torch.equal(now.gather(pick)[0], reference[:, [keep[i] for i in pick]])
    assert torch.equal(now.gather(pick, layer=1)[1], reference[1, [keep[i] for i in pick]] + 1)
    assert now.gather([], layer=0)[0].shape == (0, 1, 3)


def test_a_views_id_strings_are_the_rows_anchors_and_answers_through_appends_removals_and_scopes():
    from editors.incomes.hooks import id_string

    pool = GistPool([1, 2], 1, 4)

    def add(ids, scopes, anchors, answers):
        shape = (2, len(ids), 1, 4)
        pool.append(ids, CompressedGists(pool.layers, torch.randn(shape), torch.randn(shape)), scopes,
                    anchors=anchors, answers=answers)

    def check(view):
        parts = view.bound_parts()
        assert parts["anchors"] == [tuple(id_string(a) for a in row) for row in view.anchors]
        assert parts["answers"] == [tuple(id_string(a) for a in row) for row in view.answers]
        assert parts["row_of"] == {f: i for i, f in enumerate(view.fact_ids)}

    add([1, 2, 3], None, [[[5, 6]], [], [[7], [8, 9]]], [[[1]], [[2, 3]], []])
    check(pool.view())
    add([4, 5], ["ann", None], [[[10]], [[11, 12]]], [[[4]], [[5]]])
    assert pool.view().fact_ids == (1, 2, 3, 5) and pool.view("ann").fact_ids == (1, 2, 3, 4, 5)
    check(pool.view()), check(pool.view("ann")), check(pool.view_all())
    pool.remove(2)
    pool.set_answers(3, [[42, 43]])
    view = pool.view("ann")
    assert view.fact_ids == (1, 3, 4, 5) and view.answers[1] == ((42, 43),)
    check(view)
