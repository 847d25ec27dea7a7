"""The relation gate: a fact's gist is read only by a query that asks what the fact answers.

The mention gate lets every query that names a fact's subject read its gist, also one that asks the subject
something else: "The taxon rank of Epaspidoceras is" reads "Which family does Epaspidoceras belong to?
Noctuidae", and a one-token gist of a 135M model tells such relations apart poorly (docs/incomes.md,
subject locality). This gate compares the query's sentence that names the subject with the fact's prompt,
both with the subject written as "X" ("Which family does X belong to?" against "The taxon rank of X is"),
by the cosine of their MiniLM embeddings (the RAG embedder). Below the threshold the row stays unread.

The threshold comes from the train files only (`scripts/relation_gate_calibration.py`, AUC 0.916 over 8,324
same-relation and 6,558 other-relation pairs), 0.4, the highest in steps of 0.05 that lets through at least
95% of counterfact-edit's paraphrases (95.9%; noisy prompts such as "Category:Nigerian traditional states
X works as"; 84.1% at 0.5). It keeps 99.2% of all same-relation pairs (paraphrases and question forms) and
blocks 19.7% of other-relation probes of the same subject (at 0.5: 94.7% and 57.1%). A fact's own prompt
always passes. Within one template ("The mother tongue of X is" / "The population of X is") MiniLM finds most
relations alike (~0.45-0.55): the gate mostly separates a question from a template probe.

A fact written as a question (ZsRE's form, and how chat users ask) gets its own threshold by the same rule:
0.5, the highest that keeps at least 95% of the same-relation pairs whose fact is a question (95.2%: its
other question forms and its cloze prompt); it blocks 59.1% of other-relation probes there, against 21.7%
at 0.4. CounterFact's noisy paraphrases, which held the shared threshold at 0.4, mostly belong to cloze facts.
Measured effect: docs/incomes.md, "The relation gate".

By default the decision is not the cosine but a learned same-relation test on the same two vectors
(editors/incomes/relation_classifier, fitted on the train files by scripts/train_relation_gate.py), with its
own two thresholds set by the same 95% rule on held-out relation texts; the cosine above is the fallback
for any other embedder, and `engram eval --methods gist-cosine` measures it.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

DEFAULT_THRESHOLD = 0.4  # facts written as a statement or cloze prompt
DEFAULT_QUESTION_THRESHOLD = 0.5  # facts written as a question ("Which family does X belong to? Noctuidae")
_BOUNDARY = re.compile(r"(?<=[.!?])\s+|\n")
_CACHE_SIZE = 4096


def is_question(relation: str) -> bool:
    """A fact written as a question gets the question threshold (cosine or learned)."""
    return relation.rstrip().endswith("?")


def relation_text(text: str, subject: str | None) -> str:
    """The sentence of `text` that names `subject`, with the subject written as "X" (the text as it is if
    the subject is not in it)."""
    found = list(re.finditer(re.escape(subject.strip()), text, re.IGNORECASE)) if subject and subject.strip() else []
    if not found:
        return " ".join(text.split())
    return _around(text[:found[-1].start()], text[found[-1].end():])


def _around(before: str, after: str) -> str:
    """X in the sentence made of the end of `before` and the start of `after`."""
    head = _BOUNDARY.split(before)[-1]
    tail = _BOUNDARY.split(after, maxsplit=1)[0]
    return " ".join(f"{head}X{tail}".split())


class RelationGate:
    """Called by the gist hooks once per query sequence: which of the rows it mentions may it read."""

    def __init__(self, tokenizer, embedder=None, threshold: float = DEFAULT_THRESHOLD,
                 question_threshold: float = DEFAULT_QUESTION_THRESHOLD, classifier="default"):
        """`classifier`: a RelationClassifier, None (the cosine and its thresholds), or "default": the
        shipped classifier if it was fitted on this gate's embedder, else the cosine."""
        for value in (threshold, question_threshold):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"relation gate threshold must be in [0, 1], got {value}")
        self.tokenizer, self.threshold, self.question_threshold = tokenizer, threshold, question_threshold
        self._embedder, self._classifier = embedder, classifier
        self._vectors: OrderedDict[str, np.ndarray] = OrderedDict()

    @property
    def classifier(self):
        """The learned test in use, or None when the gate compares cosines."""
        if isinstance(self._classifier, str):
            from editors.incomes.relation_classifier import default_classifier

            self._classifier = default_classifier(getattr(self.embedder, "name", None))
        return self._classifier

    @property
    def embedder(self):
        if self._embedder is None:
            from memory.embeddings import default_embedder

            self._embedder = default_embedder()
        return self._embedder

    def __call__(self, seq: list[int], rows: Sequence[int], pool) -> set[int]:
        """Rows (mentioned by `seq`) whose relation text is close enough to the query's sentence."""
        by_subject: dict[tuple, str] = {}  # rows of one subject share its anchors: cut the query once
        queries = {}
        for i in rows:
            key = tuple(pool.anchors[i])
            if key not in by_subject:
                by_subject[key] = self.query_text(seq, key)
            queries[i] = by_subject[key]
        vectors = self.vectors([pool.relations[i] for i in rows] + list(queries.values()))
        rows = list(rows)
        if self.classifier is None or not rows:
            return {i for i in rows if float(vectors[pool.relations[i]] @ vectors[queries[i]])
                    >= self.threshold_for(pool.relations[i])}
        relations, asked = [pool.relations[i] for i in rows], [queries[i] for i in rows]
        logits = self.classifier.logits(np.stack([vectors[t] for t in relations]),
                                        np.stack([vectors[t] for t in asked]), relations, asked)  # [rows]
        return {i for i, logit, rel, query in zip(rows, logits, relations, asked)
                if query == rel or logit >= self.classifier.threshold_for(rel)}  # its own prompt always reads

    def threshold_for(self, relation: str) -> float:
        """The threshold for a fact with this relation text: its own for a question, the shared one else."""
        return self.question_threshold if is_question(relation) else self.threshold

    def query_text(self, seq: list[int], anchors: Sequence[str]) -> str:
        """The query's sentence around its last mention of the subject (anchors: id strings, hooks.id_string)."""
        text = "".join(map(chr, seq))
        best, at = None, -1
        for anchor in anchors:
            pos = text.rfind(anchor)
            if pos > at:
                best, at = anchor, pos
        if best is None:
            return self.tokenizer.decode(seq, skip_special_tokens=True)
        decode = self.tokenizer.decode
        before = decode(seq[:at], skip_special_tokens=True)
        after = decode(seq[at + len(best):], skip_special_tokens=True)
        return _around(before + (" " if decode([ord(best[0])]).startswith(" ") else ""), after)

    def vectors(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Unit embeddings of `texts`, cached (relation texts recur in every query)."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._vectors))
        if missing:
            for text, vec in zip(missing, self.embedder.embed(missing)):
                self._vectors[text] = vec
        out = {}
        for text in texts:
            self._vectors.move_to_end(text)
            out[text] = self._vectors[text]
        while len(self._vectors) > _CACHE_SIZE:
            self._vectors.popitem(last=False)
        return out
