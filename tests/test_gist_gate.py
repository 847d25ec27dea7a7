"""The mention gate: a gist added with its subject is read only by queries that name that subject."""
from __future__ import annotations

import pytest
import torch

from editors.incomes import GistAddon, GistConfig, GistPool
from editors.incomes.memory import GistMemory
from editors.model import tiny_llama, tiny_tokenizer

FACTS = ["The capital of Zorbia is Quellton.", "The river of Vantor is the Mizz."]
SUBJECTS = ["Zorbia", "Vantor"]


# A batch of two runs other BLAS kernels than one text alone: the last bits may differ, so rows are compared
# within this tolerance, and reading must move a row by far more than it.
BATCH_ATOL = 1e-4


def assert_gated_separately(together, read_alone, read_unread, unread_alone, unread_read) -> None:
    """Row 0 of a batch reads like its text alone; row 1, which names no subject of the pool, does not."""
    torch.testing.assert_close(together[0], read_alone, atol=BATCH_ATOL, rtol=0)
    torch.testing.assert_close(together[1], unread_alone, atol=BATCH_ATOL, rtol=0)
    assert (read_alone - read_unread).abs().max() > 100 * BATCH_ATOL  # reading really moved row 0
    assert torch.equal(unread_alone, unread_read)  # row 1 alone: the same computation, read or not


def memory(gate: bool = True) -> GistMemory:
    model = tiny_llama(seed=1).eval()
    model.requires_grad_(False)
    addon = GistAddon.for_model(model, GistConfig(adapter_rank=4, zero_key_init_std=0.1, gate_init=1.0))
    mem = GistMemory(model, tiny_tokenizer(), addon, mention_gate=gate)
    mem.add([1, 2], FACTS, subjects=SUBJECTS)
    return mem


def logits(mem: GistMemory, text: str, read: bool = True) -> torch.Tensor:
    ids = mem.tokenizer(text, return_tensors="pt")["input_ids"]
    if not read:
        return mem.model(ids).logits
    with mem.reading():
        return mem.model(ids).logits


@pytest.fixture(scope="module")
def gated():
    mem = memory()
    yield mem
    mem.close()


def test_a_query_that_names_no_subject_is_exactly_the_base_model(gated):
    text = "The capital of Blargland is"
    assert torch.equal(logits(gated, text), logits(gated, text, read=False))


def test_a_query_that_names_the_subject_reads_its_gist(gated):
    for text in ("The capital of Zorbia is", "zorbia's capital is", "Where does the Vantor flow?"):
        assert not torch.equal(logits(gated, text), logits(gated, text, read=False)), text


def test_without_the_gate_every_query_reads_the_pool():
    mem = memory(gate=False)
    try:
        text = "The capital of Blargland is"
        assert not torch.equal(logits(mem, text), logits(mem, text, read=False))
    finally:
        mem.close()


def test_rows_of_one_batch_are_gated_separately(gated):
    tok = gated.tokenizer
    texts = ["The capital of Zorbia is", "The capital of Blargl is"]  # equal lengths: no padding
    batch = tok(texts, return_tensors="pt")["input_ids"]
    with gated.reading():
        together = gated.model(batch).logits
    assert_gated_separately(together, logits(gated, texts[0])[0], logits(gated, texts[0], read=False)[0],
                            logits(gated, texts[1], read=False)[0], logits(gated, texts[1])[0])


def test_decoding_keeps_the_gate_of_the_prompt(gated):
    """A decoding step sees one new token; the gate must still count the prompt's mention."""
    from editors.prefix_cache import cache_kwarg, cache_of

    model = gated.model
    ids = gated.tokenizer("Zorbia: the capital is", return_tensors="pt")["input_ids"]
    step = torch.tensor([[ids[0, -1].item()]])
    whole = torch.cat([ids, step], dim=1)
    with gated.reading():
        cache = cache_of(model(ids, use_cache=True))
        decoded = model(step, use_cache=True, **{cache_kwarg(model): cache}).logits[0, -1]
        full = model(whole).logits[0, -1]
    base = logits(gated, gated.tokenizer.decode(whole[0], skip_special_tokens=True), read=False)[0, -1]
    torch.testing.assert_close(decoded, full, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(decoded, base, atol=1e-3)  # the step really read the gist


def test_anchors_survive_save_and_load(gated, tmp_path):
    path = gated.save(tmp_path / "pool.safetensors")
    loaded = GistPool.load(path)
    assert loaded.view().anchors == gated.pool.view().anchors
    assert len(loaded.view().anchors[0]) >= 2  # "Zorbia" at the start and after a space (and case-flipped)


def test_anchor_forms(gated):
    forms = [gated.tokenizer.decode(ids) for ids in gated.anchors("the Beatles")]
    assert {"the Beatles", " the Beatles", "The Beatles", " The Beatles"} <= set(forms)
    assert gated.anchors(None) == [] and gated.anchors("  ") == []


def test_temperature_follows_the_rows_a_query_may_read():
    """T = 0.45 sharpens reading once more than 10 gists are visible; a gated query that sees only its
    subject's gist among 12 in the pool reads it exactly as from a pool of that gist alone (T = 1)."""
    mem = memory()
    try:
        mem.remove(2)  # the pool: the Zorbia fact alone
        text = "The capital of Zorbia is"
        alone = logits(mem, text)
        mem.add(list(range(10, 21)), [f"Town{i} lies on the river Ost{i}." for i in range(11)],
                subjects=[f"Town{i}" for i in range(11)])
        assert len(mem) == 12 and torch.allclose(logits(mem, text), alone, atol=1e-5)
        assert mem.addon.temperature([11, 3]).flatten().tolist() == pytest.approx([0.45, 1.0])
        assert mem.addon.temperature([11, 12]) == pytest.approx(0.45)  # one T for all rows: a plain float
        mem.addon.train()
        assert mem.addon.temperature([11, 3]) == 1.0  # never in training
        mem.addon.eval()
    finally:
        mem.close()


def test_teacher_forced_scoring_gates_on_the_prompt_only(gated):
    """Scoring feeds prompt and target in one forward; a subject named only in the target must not let the
    prompt's positions read its gist (a causal model's prediction never depends on the tokens after it)."""
    from editors.causal import prompts_end_at
    from evaluation import metrics

    prompt, target = "The capital of Blargland is", "Zorbia or Vantor"
    ids, start = metrics.encode_target(gated.tokenizer, prompt, target)
    whole = torch.tensor([ids])
    base = gated.model(whole).logits[0]
    with gated.reading():
        anywhere = gated.model(whole).logits[0]  # the whole sequence decides: the target's mention reads
        with prompts_end_at([start]):
            causal = gated.model(whole).logits[0]
        scored = metrics.argmax_tokens(gated.model, gated.tokenizer, [prompt], [target])[0]
    assert not torch.equal(anywhere[:start], base[:start])
    assert torch.equal(causal, base)  # the prompt names no subject: nothing is read, not even later
    assert scored == metrics.span_argmax(base, start, len(ids)).tolist()
