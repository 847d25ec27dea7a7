"""The methods an evaluation compares on one stream of cases, behind one small protocol.

A method learns cases (`learn`), rewrites the queries it is asked (`prompts`: ICL and RAG put facts in
front, the others leave queries alone) and answers with `model` (weight editors change it in place).
`checkpoint`/`restore` give the single-case protocol its undo; `reset` returns to the base model.
Nothing here branches on a method's name: the table at the bottom maps names to classes.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from editors.base import EditRequest, restore, snapshot
from evaluation.datasets import EditCase

log = logging.getLogger(__name__)

ContextsFn = Callable[[str, str], Sequence[str]]  # (prompt, target) -> paraphrase contexts


@dataclass
class Learned:
    """What learning one case cost and whether every edit of it took."""

    seconds: float = 0.0
    steps: int = 0
    ok: bool = True
    error: str | None = None


def statement(prompt: str, target: str) -> str:
    return f"{prompt.strip()} {target.strip()}"


class Method:
    """The base model: learns nothing. Subclasses override what they change."""

    name = "base"
    stable_prefixes = False  # True: prompts grow at their end and weights never change (prefix KV reusable)
    learns = False  # the base model: learning changes nothing, so retention equals the gap-0 scores
    saves_state = False  # True: save_state writes the weights; the others rebuild by replaying the cases

    def __init__(self, model, tokenizer, **_):
        self.model, self.tokenizer = model, tokenizer

    def unavailable(self) -> str | None:
        """None when the method can run, else the reason it cannot (reported, never faked)."""
        return None

    def learn(self, case: EditCase) -> Learned:
        return Learned()

    def prompts(self, queries: Sequence[str]) -> list[str]:
        return list(queries)

    def active(self):
        """A context the method's forwards run inside (the gist pool reads there)."""
        return contextlib.nullcontext()

    def checkpoint(self):
        return None

    def restore(self, token) -> None:
        pass

    def reset(self) -> None:
        pass

    def save_state(self, path: Path, meta: dict[str, str] | None = None) -> None:
        """Keep what `load_state` needs, with `meta` (the harness's bookkeeping) in the same file."""

    def load_state(self, path: Path, cases: Sequence[EditCase]) -> None:
        pass


class FactListMethod(Method):
    """Shared by ICL and RAG: the facts learned so far, as statements."""

    learns = True

    def __init__(self, model, tokenizer, **kw):
        super().__init__(model, tokenizer)
        self.statements: list[str] = []

    def learn(self, case: EditCase) -> Learned:
        for edit in case.edits:
            self._add(statement(edit.prompt, edit.target))
        return Learned()

    def _add(self, text: str) -> None:
        self.statements.append(text)

    def checkpoint(self):
        return len(self.statements)

    def restore(self, token) -> None:
        del self.statements[token:]

    def reset(self) -> None:
        self.restore(0)

    def load_state(self, path: Path, cases: Sequence[EditCase]) -> None:
        self.reset()  # the state of a fact list is the cases learned, so replay them
        for case in cases:
            self.learn(case)


class ICLMethod(FactListMethod):
    """Every learned fact in the prompt, cut (oldest first) to the context window with a warning."""

    name = "icl"
    stable_prefixes = True  # one facts block, one line longer per learned fact

    def __init__(self, model, tokenizer, answer_tokens: int = 32, **kw):
        super().__init__(model, tokenizer)
        window = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
        self.max_tokens = min(window, 8192) - answer_tokens

    def prompts(self, queries: Sequence[str]) -> list[str]:
        from editors.prompting import icl_prompt

        return [icl_prompt(self.statements, q, self.tokenizer, self.max_tokens, style="completion").prompt
                for q in queries]


class RAGMethod(FactListMethod):
    """The top-k learned facts by MiniLM similarity, through a FAISS inner-product index."""

    name = "rag"

    def __init__(self, model, tokenizer, rag_k: int = 10, embedder=None, **kw):
        super().__init__(model, tokenizer)
        self.k, self._embedder, self._index = rag_k, embedder, None

    def _index_now(self):
        if self._index is None:
            from memory.vector import VectorIndex

            self._index = VectorIndex(embedder=self._embedder)
        return self._index

    def _add(self, text: str) -> None:
        self._index_now().add([len(self.statements)], [text])
        self.statements.append(text)

    def restore(self, token) -> None:
        gone = range(token, len(self.statements))
        if len(gone):
            self._index_now().remove(list(gone))
        del self.statements[token:]

    def prompts(self, queries: Sequence[str]) -> list[str]:
        from editors.prompting import rag_prompt

        if not self.statements:
            return list(queries)
        index = self._index_now()
        vectors = index.embedder.embed(list(queries))
        hits = index.search_vectors(vectors, k=self.k)
        return [rag_prompt([self.statements[i] for i, _ in found], q, style="completion")
                for q, found in zip(queries, hits)]


class RAGSubjectMethod(RAGMethod):
    """RAG over the facts whose subject the query names: the gist pool's mention gate, then MiniLM's top k.

    A fair baseline for the gated pool: the same exact filter (editors/incomes/mention runs the pool's own
    gate), so the two differ only in how the visible facts reach the model. A fact learned without a
    subject is visible to every query, as a pool row without anchors is. A query that sees no fact is left
    as it is, the base model's prompt. Unlike the pool, the choice is made once on the query's text:
    tokens the model goes on to generate never add facts.
    """

    name = "rag-subject"

    def __init__(self, model, tokenizer, rag_k: int = 10, embedder=None, **kw):
        super().__init__(model, tokenizer, rag_k=rag_k, embedder=embedder)
        self.anchors: list[list[list[int]]] = []  # per statement, its subject's anchors ([]: seen by all)

    def learn(self, case: EditCase) -> Learned:
        from editors.incomes.mention import subject_anchors

        for edit in case.edits:
            self.anchors.append(subject_anchors(self.tokenizer, edit.subject))
            self._add(statement(edit.prompt, edit.target))
        return Learned()

    def restore(self, token) -> None:
        super().restore(token)
        del self.anchors[token:]

    def prompts(self, queries: Sequence[str]) -> list[str]:
        from editors.incomes.mention import visible_facts
        from editors.prompting import rag_prompt

        seen = visible_facts(self.tokenizer, queries, self.anchors)
        asked = [i for i, row in enumerate(seen) if any(row)]
        out = list(queries)
        if not asked:
            return out
        index = self._index_now()
        # every fact ranked by RAG's own index and scores, then cut to the visible ones: exact, and at
        # benchmark sizes (hundreds of facts) one flat scan costs no more than a top-k one
        ranked = index.search_vectors(index.embedder.embed([queries[i] for i in asked]), k=len(self.statements))
        for i, found in zip(asked, ranked):
            kept = [self.statements[f] for f, _ in found if seen[i][f]][: self.k]
            out[i] = rag_prompt(kept, queries[i], style="completion")
        return out


PRESERVED = "preserved::"  # state-file tensors that hold a constrained editor's keys, not weights


class WeightEditMethod(Method):
    """ICE or FT-M: each case's edits applied in place to the live model, building on the last."""

    learns = True
    saves_state = True

    def __init__(self, model, tokenizer, contexts_fn: ContextsFn | None = None, editor_overrides=None, **kw):
        super().__init__(model, tokenizer)
        self.contexts_fn = contexts_fn
        self._overrides = editor_overrides or {}
        self._editor = None
        self._base: dict[str, torch.Tensor] | None = None
        self._applied: list[EditRequest] = []  # the edits now in the weights (a constrained editor keeps their keys)

    @property
    def editor(self):
        if self._editor is None:
            from editors.registry import make_editor

            self._editor = make_editor(self.name, self.model, self.tokenizer, **self._overrides)
            self._base = snapshot(self.model, self._editor.parameter_names())
        return self._editor

    def unavailable(self) -> str | None:
        try:
            self.editor
        except ImportError as exc:
            return f"the {self.name} editor is not available: {exc}"
        return None

    def learn(self, case: EditCase) -> Learned:
        done = Learned()
        for edit in case.edits:
            contexts = tuple(self.contexts_fn(edit.prompt, edit.target)) if self.contexts_fn else ()
            request = EditRequest(edit.prompt, edit.target, contexts, fact_id=len(self._applied), subject=edit.subject)
            result = self.editor.edit(request)
            if result.ok:
                self._applied.append(request)
            done.seconds += result.seconds
            done.steps += result.steps
            if not result.ok:
                done.ok, done.error = False, result.error
        return done

    def checkpoint(self):
        return snapshot(self.model, self.editor.parameter_names())

    def restore(self, token) -> None:
        """Back to a checkpoint: the harness takes them before a case of the single protocol, on the base."""
        restore(self.model, token)
        self._preserve([])

    def reset(self) -> None:
        if self._base is not None:
            restore(self.model, self._base)
        self._preserve([])

    def _preserve(self, requests: list[EditRequest]) -> None:
        self._applied = list(requests)
        if self._editor is not None and hasattr(self._editor, "preserve"):
            self._editor.preserve(self._applied)

    def save_state(self, path: Path, meta: dict[str, str] | None = None) -> None:
        from safetensors.torch import save_file

        from memory.atomic import atomic_write

        # one file, replaced in one step: the weights and the metadata saying which cases they hold agree
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.checkpoint().items()}
        keeper = getattr(self.editor, "preserved_keys", None)  # a constrained editor's keys resume exactly
        for fact_id, by_name in (keeper() if keeper else {}).items():
            tensors.update({f"{PRESERVED}{fact_id}{PRESERVED}{n}": k.detach().cpu().contiguous()
                            for n, k in by_name.items()})
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))

    def load_state(self, path: Path, cases: Sequence[EditCase]) -> None:
        from safetensors.torch import load_file

        saved = load_file(str(path))
        keys: dict[int, dict[str, torch.Tensor]] = {}
        for name in [n for n in saved if n.startswith(PRESERVED)]:
            _, fact_id, matrix = name.split(PRESERVED)
            keys.setdefault(int(fact_id), {})[matrix] = saved.pop(name)
        restore(self.model, saved)
        requests = [EditRequest(e.prompt, e.target, fact_id=i, subject=e.subject)
                    for i, e in enumerate(e for case in cases for e in case.edits)]
        if keys and hasattr(self.editor, "restore_preserved"):
            self._applied = requests
            self.editor.restore_preserved(dict(sorted(keys.items())))
        else:  # a file from before the keys were saved: they are taken from the loaded model
            self._preserve(requests)


class ICEMethod(WeightEditMethod):
    name = "ice"


class FTMMethod(WeightEditMethod):
    name = "ftm"


class BoxICEMethod(WeightEditMethod):
    """ICE as it was before the null-space defaults: the L-inf box alone (editors/registry.BOX)."""

    name = "ice-box"


class BoxFTMMethod(WeightEditMethod):
    name = "ftm-box"


class GistMethod(Method):
    """The InComeS gist pool: each learned fact is compressed into one row; queries read the pool."""

    learns = True

    name = "gist"
    mention_gate = True  # a fact's gist is read only by queries that mention its subject (GistMemory)
    relation_gate = True  # ... and ask what its prompt asks (editors/incomes/relation_gate)
    relation_classifier = "default"  # the gate's learned same-relation test (None: MiniLM cosine)
    answer_copy = True  # a begun answer of a readable fact is finished from its token ids (answer_copy)

    def __init__(self, model, tokenizer, model_name: str = "smollm2-135m", gist_addon=None, **kw):
        super().__init__(model, tokenizer)
        self._model_name, self._addon_source, self._memory, self._reason = model_name, gist_addon, None, None
        self._count = 0

    @property
    def memory(self):
        if self._memory is None:
            from editors.incomes.memory import GistMemory
            from editors.incomes.modules import GistAddon
            from editors.incomes.relation_gate import RelationGate

            gates = {"mention_gate": self.mention_gate, "answer_copy": self.answer_copy,
                     "relation_gate": RelationGate(self.tokenizer, classifier=self.relation_classifier)
                     if self.relation_gate else None}
            if isinstance(self._addon_source, GistAddon):
                self._memory = GistMemory(self.model, self.tokenizer, self._addon_source, **gates)
            else:
                self._memory = GistMemory.open(self.model, self.tokenizer, self._model_name, self._addon_source,
                                               **gates)
        return self._memory

    def unavailable(self) -> str | None:
        from memory.errors import ConfigError

        try:
            self.memory
        except ConfigError as exc:
            return str(exc)
        return None

    def learn(self, case: EditCase) -> Learned:
        import time

        started = time.perf_counter()
        texts = [statement(e.prompt, e.target) for e in case.edits]
        self.memory.add(list(range(self._count, self._count + len(texts))), texts,
                        subjects=[e.subject for e in case.edits], prompts=[e.prompt for e in case.edits],
                        answers=[e.target for e in case.edits])
        self._count += len(texts)
        return Learned(seconds=time.perf_counter() - started)

    def active(self):
        return self.memory.reading()

    def checkpoint(self):
        return self._count

    def restore(self, token) -> None:
        for fact_id in range(token, self._count):
            self.memory.remove(fact_id)
        self._count = token

    def reset(self) -> None:
        if self._memory is not None:
            self.restore(0)
            self._memory.close()
            self._memory = None
        self._count = 0

    def load_state(self, path: Path, cases: Sequence[EditCase]) -> None:
        self.restore(0)  # compression is deterministic: replaying the learned cases rebuilds the pool
        for case in cases:
            self.learn(case)


class UngatedGistMethod(GistMethod):
    """The gist pool with every gist readable by every query: the learned selection alone."""

    name = "gist-ungated"
    mention_gate = False


class CosineGistMethod(GistMethod):
    """The gist pool with the relation gate deciding by MiniLM cosine instead of its learned test."""

    name = "gist-cosine"
    relation_classifier = None


class MentionGistMethod(GistMethod):
    """The gist pool with the mention gate alone (no relation gate)."""

    name = "gist-mention"
    relation_gate = False


class NoCopyGistMethod(GistMethod):
    """The gist pool with both gates and no answer copy: what the gists alone give."""

    name = "gist-nocopy"
    answer_copy = False


METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (Method, FTMMethod, ICEMethod, BoxICEMethod, BoxFTMMethod, GistMethod,
                                                              CosineGistMethod, UngatedGistMethod,
                                                              MentionGistMethod, NoCopyGistMethod, ICLMethod,
                                                              RAGMethod, RAGSubjectMethod)}
