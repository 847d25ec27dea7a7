"""The relation gate: of the facts a query mentions, only those whose prompt asks what the query asks are read."""
from __future__ import annotations

import pytest
import torch

from editors.incomes import GistAddon, GistConfig, GistPool
from editors.incomes.memory import GistMemory
from editors.incomes.relation_gate import RelationGate, relation_text
from editors.model import tiny_llama, tiny_tokenizer
from memory.embeddings import HashEmbedder
from tests.test_gist_gate import assert_gated_separately, logits

PROMPTS = ["Which family does Zorbia belong to?", "Which river does Vantor lie on?"]
FACTS = [f"{PROMPTS[0]} Quellidae.", f"{PROMPTS[1]} The Mizz."]
SUBJECTS = ["Zorbia", "Vantor"]


def make_memory(threshold: float = 0.5) -> GistMemory:
    model = tiny_llama(seed=1).eval()
    model.requires_grad_(False)
    addon = GistAddon.for_model(model, GistConfig(adapter_rank=4, zero_key_init_std=0.1, gate_init=1.0))
    tok = tiny_tokenizer()
    gate = RelationGate(tok, HashEmbedder(dim=256), threshold=threshold, question_threshold=threshold)  # bag of words
    mem = GistMemory(model, tok, addon, relation_gate=gate)
    mem.add([1, 2], FACTS, subjects=SUBJECTS, prompts=PROMPTS)
    return mem


@pytest.fixture(scope="module")
def mem():
    memory = make_memory()
    yield memory
    memory.close()


def test_relation_text_is_the_sentence_that_names_the_subject():
    assert relation_text("Which family does Epaspidoceras belong to? Noctuidae", "Epaspidoceras") == \
        "Which family does X belong to?"
    assert relation_text("Noise about ships.\nToko Yasuda is known for", "toko yasuda") == "X is known for"
    assert relation_text("No subject here", "Zorbia") == "No subject here"
    assert relation_text("A text", None) == "A text"


def test_the_fact_s_own_question_reads_it(mem):
    text = "Which family does Zorbia belong to?"
    assert not torch.equal(logits(mem, text), logits(mem, text, read=False))


def test_another_relation_of_the_same_subject_is_exactly_the_base_model(mem):
    text = "The taxon rank of Zorbia is"  # names Zorbia, asks something else
    assert torch.equal(logits(mem, text), logits(mem, text, read=False))


def test_the_query_text_is_cut_around_the_mention(mem):
    tok = mem.tokenizer
    ids = tok("Some words first. Which river does Vantor lie on? Then more.", add_special_tokens=False)["input_ids"]
    anchors = ["".join(map(chr, a)) for a in mem.anchors("Vantor")]
    assert mem.relation_gate.query_text(ids, anchors) == "Which river does X lie on?"


def test_rows_of_one_batch_get_their_own_relation_decision(mem):
    texts = ["Which family does Zorbia belong to?", "The taxon rank of Zorbia is as said"]
    batch = mem.tokenizer(texts, return_tensors="pt", padding=True)
    assert batch["attention_mask"].all(), "the two texts must tokenize to equal lengths"
    with mem.reading():
        together = mem.model(batch["input_ids"]).logits
    assert_gated_separately(together, logits(mem, texts[0])[0], logits(mem, texts[0], read=False)[0],
                            logits(mem, texts[1], read=False)[0], logits(mem, texts[1])[0])


def test_relations_survive_save_and_load(mem, tmp_path):
    loaded = GistPool.load(mem.save(tmp_path / "pool.safetensors"))
    assert loaded.view().relations == ("Which family does X belong to?", "Which river does X lie on?")
    loaded.remove(1)
    assert loaded.view().relations == ("Which river does X lie on?",)


def test_a_zero_threshold_lets_every_mention_read():
    memory = make_memory(threshold=0.0)
    try:
        text = "The taxon rank of Zorbia is"
        assert not torch.equal(logits(memory, text), logits(memory, text, read=False))
    finally:
        memory.close()
    with pytest.raises(ValueError):
        RelationGate(None, HashEmbedder(dim=8), threshold=1.5)


def test_decoding_keeps_the_relation_decision_of_the_prompt(mem):
    from editors.prefix_cache import cache_kwarg, cache_of

    ids = mem.tokenizer("Which family does Zorbia belong to? It is", return_tensors="pt")["input_ids"]
    step = torch.tensor([[ids[0, -1].item()]])
    with mem.reading():
        cache = cache_of(mem.model(ids, use_cache=True))
        decoded = mem.model(step, use_cache=True, **{cache_kwarg(mem.model): cache}).logits[0, -1]
        full = mem.model(torch.cat([ids, step], dim=1)).logits[0, -1]
    torch.testing.assert_close(decoded, full, atol=1e-5, rtol=1e-4)


def test_a_pool_saved_before_relation_texts_loads_gated_by_mention_only(mem, tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from editors.incomes.pool import META_KEY

    path = mem.save(tmp_path / "pool.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()[META_KEY])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    del meta["relations"]  # as pools were written before the relation gate
    save_file(tensors, str(path), metadata={META_KEY: json.dumps(meta)})
    old = GistPool.load(path)
    assert old.view().relations == () and old.view().anchors == mem.pool.view().anchors


def test_a_fact_written_as_a_question_has_its_own_threshold():
    """At one cosine between the two thresholds, a cloze fact is read and a question fact is not."""
    from types import SimpleNamespace

    import numpy as np

    class FixedCosine:  # every query vector meets every relation vector at cosine 0.45
        def embed(self, texts):
            angle = np.arccos(0.45)
            return np.array([[1.0, 0.0] if t.startswith("q:") else [np.cos(angle), np.sin(angle)] for t in texts])

    gate = RelationGate(None, FixedCosine())
    assert gate.threshold_for("Which family does X belong to?") == 0.5
    assert gate.threshold_for("X is a native speaker of") == gate.threshold == 0.4
    gate.query_text = lambda seq, anchors: "q: " + "".join(anchors)
    pool = SimpleNamespace(anchors=[("a",), ("b",)], relations=["Which family does X belong to?", "X is a member of"])
    assert gate([1, 2, 3], [0, 1], pool) == {1}
    with pytest.raises(ValueError):
        RelationGate(None, FixedCosine(), question_threshold=-0.1)
