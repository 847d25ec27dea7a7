"""`rag-subject`: RAG over the facts whose subject the query names, by the gist pool's own mention gate."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from editors.incomes import GistAddon, GistConfig
from editors.incomes.memory import GistMemory
from editors.incomes.mention import subject_anchors, visible_facts
from editors.model import tiny_llama, tiny_tokenizer
from editors.prompting import BULLET
from evaluation.datasets import EditCase
from evaluation.harness import EvalConfig, Harness
from evaluation.methods import METHODS, RAGMethod, RAGSubjectMethod, statement
from memory.embeddings import HashEmbedder
from tests.test_harness import Loaded
from tests.test_harness_resume import assert_same_records, points

FIXTURES = Path(__file__).parent / "fixtures" / "datasets"
EMBEDDER = HashEmbedder(256)


def case(subject: str, prompt: str, target: str, case_id: str | None = None) -> EditCase:
    return EditCase(case_id=case_id or prompt, prompt=prompt, subject=subject, target=target)


def method(*cases: EditCase, k: int = 10, cls: type[RAGMethod] = RAGSubjectMethod) -> RAGMethod:
    m = cls(None, tiny_tokenizer(), rag_k=k, embedder=EMBEDDER)
    for c in cases:
        m.learn(c)
    return m


def shown(prompt: str) -> list[str]:
    """The fact statements a RAG prompt shows, in its order (best last)."""
    return [line[len(BULLET):] for line in prompt.splitlines() if line.startswith(BULLET)]


ZORBIA = case("Zorbia", "The anthem of Zorbia was written by", "Pell")
VANTOR = case("Vantor", "The capital city of Vantor is", "Mizz")


def test_it_is_in_the_methods_table():
    assert METHODS["rag-subject"] is RAGSubjectMethod
    assert EvalConfig(dataset="x", out="y", methods=["rag", "rag-subject"]).methods[-1] == "rag-subject"


def test_a_query_naming_a_subject_sees_only_that_subjects_facts():
    query = "The capital city of Zorbia is"
    plain = method(ZORBIA, VANTOR, k=1, cls=RAGMethod).prompts([query])[0]
    assert shown(plain) == [statement(VANTOR.prompt, VANTOR.target)]  # by embedding, B's fact is the nearer
    got = method(ZORBIA, VANTOR).prompts([query])[0]
    assert shown(got) == [statement(ZORBIA.prompt, ZORBIA.target)] and got.endswith(query)


def test_a_query_naming_no_learned_subject_is_left_unchanged():
    queries = ["The capital city of Blargland is", "Who wrote the anthem?"]
    assert method(ZORBIA, VANTOR).prompts(queries) == queries
    assert method().prompts(queries) == queries  # nothing learned yet


def test_top_k_among_the_visible_facts_follows_the_embedding_scores():
    zorbia = [case("Zorbia", f"The {what} of Zorbia is", f"X{i}") for i, what in
              enumerate(["capital city", "capital", "largest city", "river", "national bird"])]
    query = "The capital city of Zorbia is"
    m = method(*zorbia, VANTOR, k=3)
    texts = [statement(c.prompt, c.target) for c in zorbia]
    scores = EMBEDDER.embed(texts) @ EMBEDDER.embed([query])[0]
    best = [texts[i] for i in np.argsort(-scores, kind="stable")[:3]]
    assert len(set(np.round(scores, 6))) == len(scores)  # no ties: the order below is the scores' alone
    assert shown(m.prompts([query])[0]) == best[::-1]  # best last, nearest the query, as RAG shows them


def test_a_fact_without_subject_is_seen_by_every_query():
    loose = case("", "Bananas grow on", "giant herbs")
    m = method(ZORBIA, VANTOR, loose)
    assert shown(m.prompts(["Where do bananas grow?"])[0]) == ["Bananas grow on giant herbs"]
    with_zorbia = shown(m.prompts(["Who wrote the anthem of Zorbia?"])[0])
    assert set(with_zorbia) == {"Bananas grow on giant herbs", statement(ZORBIA.prompt, ZORBIA.target)}


def test_restore_and_replay_keep_the_anchors_with_their_facts():
    m = method(ZORBIA)
    token = m.checkpoint()
    m.learn(VANTOR)
    assert shown(m.prompts(["Vantor's capital is"])[0]) == [statement(VANTOR.prompt, VANTOR.target)]
    m.restore(token)
    assert len(m.anchors) == len(m.statements) == 1
    assert m.prompts(["Vantor's capital is"]) == ["Vantor's capital is"]
    m.load_state(Path("unused"), [VANTOR])
    assert m.anchors == [subject_anchors(m.tokenizer, "Vantor")] and len(m.statements) == 1


# -- the same filter as the gist pool's gate -------------------------------------------------------
SUBJECTS = ["Zorbia", "the Beatles", "Tindle Bay", ""]
FACTS = ["The capital of Zorbia is Quellton", "The Beatles came from Leeds", "Tindle Bay opens onto the Pacific",
         "Violins have four strings"]
QUERIES = ["zorbia's capital is", "The capital of Zorbia is", "Who were the Beatles?", "The Beatles' drummer was",
           "the beatles sang", "Which ocean borders tindle Bay?", "Tindle bay is", "ZORBIA is",
           "Where is Blargland?", "Zorbia and the Beatles"]


@pytest.fixture(scope="module")
def pool():
    model = tiny_llama(seed=1).eval()
    model.requires_grad_(False)
    addon = GistAddon.for_model(model, GistConfig(adapter_rank=4, zero_key_init_std=0.1, gate_init=1.0))
    mem = GistMemory(model, tiny_tokenizer(), addon, answer_copy=False)  # the mention gate alone
    mem.add(list(range(len(FACTS))), FACTS, subjects=SUBJECTS)
    yield mem
    mem.close()


def pool_visible(mem: GistMemory, query: str) -> list[bool]:
    """The rows the gist pool lets `query` read, as its hooks decide in a real forward."""
    ids = mem.tokenizer(query, return_tensors="pt")["input_ids"]
    with mem.reading(), torch.no_grad():
        mem.model(ids)
        visible = mem.addon.runtime.visible_dense()
    return [True] * len(FACTS) if visible is None else visible[0].tolist()


def test_the_anchors_are_the_pools(pool):
    for subject in [*SUBJECTS, None, "  Tindle   Bay ", "élan"]:
        assert subject_anchors(pool.tokenizer, subject) == pool.anchors(subject), subject


def test_the_visible_facts_are_those_the_pool_lets_a_query_read(pool):
    tok = pool.tokenizer
    m = method(*[case(s, f, "!", case_id=str(i)) for i, (s, f) in enumerate(zip(SUBJECTS, FACTS))])
    want = [pool_visible(pool, q) for q in QUERIES]
    assert visible_facts(tok, QUERIES, [pool.anchors(s) for s in SUBJECTS]) == want
    for query, row in zip(QUERIES, want):
        assert set(shown(m.prompts([query])[0])) == {statement(f, "!") for f, ok in zip(FACTS, row) if ok}, query
    # the cases that tell a gate apart: case-flipped first letter and possessive yes, other casing no
    assert want[0][0] and want[3][1] and want[5][2] and not want[4][1] and not want[6][2] and not want[7][0]
    assert want[8] == [False, False, False, True]  # only the fact without subject


# -- in the harness, like rag -----------------------------------------------------------------------
def test_the_harness_runs_and_resumes_it_like_rag(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGRAM_CACHE", str(tmp_path / "cache"))
    loaded = Loaded(tiny_llama(), tiny_tokenizer())
    cfg = EvalConfig(dataset=str(FIXTURES / "knowedit_zsre.json"), out=str(tmp_path / "out"),
                     methods=["rag", "rag-subject"], n=2, fluency_n=1, fluency_tokens=8, gen_tokens=4)
    runs = Harness(cfg, loaded, embedder=HashEmbedder(32)).run()
    assert runs["rag-subject"].available and len(runs["rag-subject"].scores) == 2
    whole = points(Path(cfg.out), "rag-subject")
    path = Path(cfg.out) / "points-rag-subject.jsonl"
    path.write_text(path.read_text().splitlines()[0] + "\n")  # killed after the first case
    assert not (Path(cfg.out) / "state-rag-subject.safetensors").exists()  # a fact list: replayed, not saved
    Harness(cfg, loaded, embedder=HashEmbedder(32)).run()
    assert_same_records(points(Path(cfg.out), "rag-subject"), whole)
    assert json.loads((Path(cfg.out) / "run.json").read_text())["rag_k"] == 10
