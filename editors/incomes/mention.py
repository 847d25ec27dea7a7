"""The gist pool's mention gate for callers outside the gist hooks (the `rag-subject` baseline).

A fact learned with a subject is visible to a query whose token ids contain one of the subject's anchors
(GistMemory.anchors: the subject at a text's start or after a space, its first letter as given or
case-flipped); a fact without anchors (no subject) is visible to every query.

Nothing is reimplemented here: both functions run the gist code itself, so the pool and a retrieval
baseline filter by one rule. They are adapters only because that code lives on stateful objects: the
anchors on a GistMemory (which attaches an add-on to a model), the gate on a GistRuntime holding a pool.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch

from editors.causal import prompts_end_at
from editors.incomes.hooks import BoundPool, GistRuntime, id_string
from editors.incomes.memory import GistMemory

Anchors = list[list[int]]  # one fact's anchors: token-id sequences


@dataclass
class _Tokenized:
    tokenizer: Any  # all that GistMemory.anchors reads of its GistMemory


def subject_anchors(tokenizer, subject: str | None) -> Anchors:
    """The token-id sequences by which a query mentions `subject` ([] for none): GistMemory.anchors itself."""
    return GistMemory.anchors(cast(GistMemory, _Tokenized(tokenizer)), subject)


def visible_facts(tokenizer, queries: Sequence[str], anchors: Sequence[Anchors]) -> list[list[bool]]:
    """Per query, per fact: may the query see the fact? The hooks' GistRuntime.gate_by_mention decides on
    the query's token ids as the model reads them (tokenized alone, special tokens as in the scorer)."""
    if not anchors:
        return [[] for _ in queries]
    runtime = GistRuntime(answer_copy=False)  # the mention gate alone: no relation gate, no answer copy
    runtime.pool = BoundPool({}, len(anchors), [[id_string(a) for a in row] for row in anchors])
    out = []
    for query in queries:  # one at a time: no padding tokens next to a query's own
        runtime.new_forward()
        runtime.history = None  # a new sequence, never a decoding step of the last one
        ids = list(tokenizer(query)["input_ids"])
        with prompts_end_at([len(ids)]):  # all of it is prompt, whatever scoring context calls us
            runtime.gate_by_mention(torch.tensor([ids], dtype=torch.long))
        visible = runtime.visible_dense()  # [1, N] over every fact (None: all visible)
        out.append([True] * len(anchors) if visible is None else visible[0].tolist())
    return out
