"""The relation gate's learned same-relation test: features, thresholds by form, persistence, fallback."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from editors.incomes import relation_classifier as rc
from editors.incomes.relation_gate import RelationGate
from memory.errors import ConfigError


def unit(*values):
    v = np.array(values, dtype=np.float32)
    return v / np.linalg.norm(v)


def test_pair_features_are_product_difference_cosine_and_forms():
    a, b = unit(1, 0, 0)[None], unit(0.6, 0.8, 0)[None]
    feats = rc.pair_features(a, b, [True], [False])
    assert feats.shape == (1, 2 * 3 + 4)
    np.testing.assert_allclose(feats[0, :3], [0.6, 0, 0], atol=1e-6)
    np.testing.assert_allclose(feats[0, 3:6], [0.4, 0.8, 0], atol=1e-6)
    np.testing.assert_allclose(feats[0, 6:], [0.6, 1, 0, 0], atol=1e-6)


def classifier(threshold=0.0, question_threshold=0.0, embedder="emb"):
    weight = np.zeros(2 * 2 + 4, dtype=np.float32)
    weight[1] = 10.0  # only agreement on the second axis says "same relation"
    return rc.RelationClassifier(weight, -1.0, threshold, question_threshold, embedder, {"command": "test"})


def test_the_learned_test_reads_what_the_weights_say_not_the_cosine():
    clf = classifier()
    rel = np.stack([unit(1, 1), unit(1, 1)])
    query = np.stack([unit(1, 1), unit(1, 0.05)])  # both close in cosine (1.0 and ~0.74)
    logits = clf.logits(rel, query, ["X is a", "X is a"], ["X is b", "X is b"])
    assert logits[0] > 0 > logits[1]


def test_a_question_fact_has_its_own_threshold():
    clf = classifier(threshold=0.0, question_threshold=2.0)
    assert clf.threshold_for("Which family does X belong to? ") == 2.0
    assert clf.threshold_for("The family of X is") == 0.0


def test_save_and_load_round_trip(tmp_path):
    clf = classifier(0.5, 0.7)
    back = rc.RelationClassifier.load(clf.save(tmp_path / "gate"))
    np.testing.assert_array_equal(back.weight, clf.weight)
    assert (back.bias, back.threshold, back.question_threshold, back.embedder, back.extra) == \
        (-1.0, 0.5, 0.7, "emb", {"command": "test"})
    with pytest.raises(ConfigError, match="cannot load"):
        rc.RelationClassifier.load(tmp_path / "missing")


def test_the_shipped_classifier_is_used_only_with_its_own_embedder():
    shipped = rc.RelationClassifier.load()
    assert rc.default_classifier(shipped.embedder) is not None
    assert rc.default_classifier("hash-bow-64") is None
    assert shipped.weight.shape == (2 * 384 + 4,)
    assert "train_relation_gate.py" in shipped.extra["command"]


def test_the_gate_decides_by_the_classifier_when_it_has_one():
    class TwoAxes:  # relation texts on one axis, queries by their first letter
        name = "emb"

        def embed(self, texts):
            return np.stack([unit(1, 1) if t.startswith("X") else unit(1, 1) if t.startswith("q1") else unit(1, 0.05)
                             for t in texts])

    gate = RelationGate(None, TwoAxes(), classifier=classifier())
    gate.query_text = lambda seq, anchors: {"a": "q1", "b": "q2"}[anchors[0]]
    pool = SimpleNamespace(anchors=[("a",), ("b",)], relations=["X is a member of", "X is a member of"])
    assert gate([1, 2], [0, 1], pool) == {0}
    strict = RelationGate(None, TwoAxes(), classifier=classifier(threshold=100.0))  # no logit reaches it
    strict.query_text = lambda seq, anchors: {"a": "X is a member of", "b": "q1"}[anchors[0]]
    assert strict([1, 2], [0, 1], pool) == {0}  # the fact's own prompt reads, whatever the logit
    cosine_only = RelationGate(None, TwoAxes(), classifier=None)
    cosine_only.query_text = gate.query_text
    assert cosine_only([1, 2], [0, 1], pool) == {0, 1}  # cosine 0.74 passes 0.4


def test_gist_uses_the_learned_test_and_gist_cosine_the_cosine():
    from editors.incomes import GistAddon, GistConfig
    from editors.model import tiny_llama, tiny_tokenizer
    from evaluation.methods import METHODS

    for name, learned in (("gist", True), ("gist-cosine", False)):
        model = tiny_llama(seed=1).eval()
        addon = GistAddon.for_model(model, GistConfig())
        method = METHODS[name](model, tiny_tokenizer(), gist_addon=addon)
        try:
            assert (method.memory.relation_gate.classifier is not None) is learned, name
        finally:
            method.reset()
