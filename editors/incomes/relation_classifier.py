"""A learned same-relation test for the relation gate, on the MiniLM vectors the gate already computes.

The cosine of two relation texts' embeddings separates a question from a template probe, but within one
form MiniLM finds most relations alike ("The mother tongue of X is" / "The population of X is": 0.45). A
logistic regression on the pair's features (the elementwise product and absolute difference of the two unit
vectors, their cosine, and which of the two is a question) learns which directions of the embedding carry
the relation. It is fitted on the train files only (`scripts/train_relation_gate.py`, which also sets its
two thresholds the way the cosine's were set: the highest that keep 95% of held-out same-relation pairs)
and is tied to the embedder it was fitted on: with any other embedder the gate falls back to the cosine.

Its size is 2 x 384 + 4 weights (3 KB). One query costs one dot product per mentioned row.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from editors.incomes.relation_gate import is_question
from memory.errors import ConfigError

DEFAULT_DIR = Path(__file__).resolve().parent / "addons" / "relation-gate"
WEIGHTS_FILE, CONFIG_FILE = "relation_gate.safetensors", "relation_gate.json"


def pair_features(relation_vectors: np.ndarray, query_vectors: np.ndarray, relation_is_question: np.ndarray,
                  query_is_question: np.ndarray) -> np.ndarray:
    """[n, 2d + 4] features of n (fact relation, query sentence) pairs of unit vectors [n, d]."""
    a, b = relation_vectors, query_vectors  # [n, d] each
    qa = np.asarray(relation_is_question, dtype=np.float32)[:, None]  # [n, 1]
    qb = np.asarray(query_is_question, dtype=np.float32)[:, None]  # [n, 1]
    cosine = (a * b).sum(axis=1, keepdims=True)  # [n, 1]
    return np.concatenate([a * b, np.abs(a - b), cosine, qa, qb, qa * qb], axis=1).astype(np.float32)


@dataclass
class RelationClassifier:
    """logit = weight . features + bias; a row is read when the logit reaches its fact's threshold."""

    weight: np.ndarray  # [2d + 4]
    bias: float
    threshold: float  # facts written as a statement or cloze prompt
    question_threshold: float  # facts written as a question
    embedder: str  # the name of the embedder whose vectors it was fitted on
    extra: dict = field(default_factory=dict)  # how it was made: command, held-out figures

    def logits(self, relation_vectors, query_vectors, relations, queries) -> np.ndarray:
        feats = pair_features(relation_vectors, query_vectors, [is_question(t) for t in relations],
                              [is_question(t) for t in queries])
        return feats @ self.weight + self.bias  # [n]

    def threshold_for(self, relation: str) -> float:
        return self.question_threshold if is_question(relation) else self.threshold

    def save(self, directory: str | Path) -> Path:
        from safetensors.numpy import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({"weight": self.weight.astype(np.float32), "bias": np.array([self.bias], np.float32)},
                  str(directory / WEIGHTS_FILE))
        config = {"embedder": self.embedder, "threshold": self.threshold,
                  "question_threshold": self.question_threshold, "extra": self.extra}
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path = DEFAULT_DIR) -> "RelationClassifier":
        from safetensors.numpy import load_file

        directory = Path(directory)
        try:
            config = json.loads((directory / CONFIG_FILE).read_text())
            tensors = load_file(str(directory / WEIGHTS_FILE))
            return cls(tensors["weight"], float(tensors["bias"][0]), float(config["threshold"]),
                       float(config["question_threshold"]), str(config["embedder"]), config.get("extra", {}))
        except (OSError, KeyError, ValueError) as exc:
            raise ConfigError(f"cannot load the relation classifier in {directory}: {exc}") from exc


def default_classifier(embedder_name: str | None) -> RelationClassifier | None:
    """The shipped classifier when it was fitted on this embedder's vectors, else None (use the cosine)."""
    if not (DEFAULT_DIR / CONFIG_FILE).exists():
        return None
    classifier = RelationClassifier.load(DEFAULT_DIR)
    return classifier if classifier.embedder == embedder_name else None
