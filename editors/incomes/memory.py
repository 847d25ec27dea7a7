"""GistMemory: the gist route as the agent and the evaluation use it.

It loads the trained add-on shipped for a model (or one given by path), attaches it to the live model,
and keeps one GistPool of compressed facts: `add` compresses facts (one batched forward, no backward)
and appends their rows, `remove` drops exactly one row, `reading(user_id)` lets the forwards inside
read global facts plus that user's (and, asked to, says which facts they read: an answer's provenance).
With no rows visible the model is bit-identical to the base model.

The mention gate (on by default): a fact added with its subject is readable only by a query whose tokens
mention that subject, so "The mother tongue of Léon Blum is" cannot read the gist of "The mother tongue of
Danielle Darrieux is English" however similar the two sentences are. A 135M model's learned selection
alone tells such neighbours apart poorly (docs/incomes.md); the gate is a scope classifier of the kind
SERAC and GRACE use, exact and free. Facts without a subject stay visible to every query, and queries that
never name the subject (multi-hop, aliases) cannot read the fact: that is the price.

The relation gate (on by default in `open`): of the facts a query mentions, the query reads
only those whose prompt asks what the query's sentence asks (editors/incomes/relation_gate), so "The taxon
rank of X is" leaves the gist of "Which family does X belong to?" unread.

The answer copy (on by default): each row keeps its fact's answer as token ids, and once a query the
gates let read the row has begun that answer, the answer's next token wins (editors/incomes/answer_copy).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path

from editors.incomes.answer_copy import answer_forms, token_forms, word_continuing_tokens
from editors.incomes.compress import add_gist_token, compress_texts
from editors.incomes.modules import CONFIG_FILE, GistAddon
from editors.incomes.pool import GistPool
from editors.incomes.relation_gate import RelationGate, relation_text
from memory.errors import ConfigError

log = logging.getLogger(__name__)

ADDON_ROOT = Path(__file__).resolve().parent / "addons"


def default_addon_dir(model_name: str) -> Path | None:
    """The add-on committed for a packaged model (e.g. addons/smollm2-135m/), if one has been trained."""
    path = ADDON_ROOT / Path(model_name).name
    return path if (path / CONFIG_FILE).exists() else None


class GistMemory:
    def __init__(self, model, tokenizer, addon: GistAddon, compress_batch: int = 32, mention_gate: bool = True,
                 relation_gate: RelationGate | None = None, answer_copy: bool = True):
        self.model, self.tokenizer, self.addon = model, tokenizer, addon
        self.compress_batch, self.mention_gate = compress_batch, mention_gate
        self.relation_gate = relation_gate if mention_gate else None  # it narrows the mention gate
        addon.attach(model, add_gist_token(tokenizer))
        addon.runtime.relation_check = self.relation_gate
        addon.runtime.answer_copy = answer_copy  # it copies only on rows the gates let a query read
        addon.runtime.word_continuing = partial(word_continuing_tokens, tokenizer) if answer_copy else None
        self.pool = GistPool.for_addon(addon)
        self._fingerprint: str | None = None

    @classmethod
    def open(cls, model, tokenizer, model_name: str, addon_dir: str | Path | None = None,
             mention_gate: bool = True, relation_gate: RelationGate | bool = True,
             answer_copy: bool = True) -> "GistMemory":
        """Load the add-on for `model_name` (or from `addon_dir`); a clear error when there is none. The
        relation gate is on unless `relation_gate=False` (True: the default RelationGate), the answer copy
        unless `answer_copy=False`."""
        if addon_dir and not Path(addon_dir).is_dir():
            raise ConfigError(f"gist add-on directory {addon_dir} does not exist")
        directory = Path(addon_dir) if addon_dir else default_addon_dir(model_name)
        if directory is None:
            raise ConfigError(f"no trained gist add-on for model {model_name!r}: train one with "
                              "`python -m editors.incomes.train` and pass its directory")
        if relation_gate is True:
            relation_gate = RelationGate(tokenizer)
        return cls(model, tokenizer, GistAddon.load(directory, model), mention_gate=mention_gate,
                   relation_gate=relation_gate or None, answer_copy=answer_copy)

    def __len__(self) -> int:
        return len(self.pool)

    def add(self, fact_ids: Sequence, texts: Sequence[str], scopes: str | None | Sequence[str | None] = None,
            subjects: Sequence[str | None] | None = None, prompts: Sequence[str | None] | None = None,
            answers: Sequence[str | None] | None = None) -> None:
        """Compress `texts` and append one row per fact; the other rows are never recomputed.

        With the mention gate on, each fact's subject (if any) becomes its anchors, and its prompt (else its
        text) the relation text that the relation gate compares queries with. Each fact's answer (its
        target, if given) is kept as token ids for the answer copy (editors/incomes/answer_copy)."""
        if not texts:
            return
        gists = compress_texts(self.model, self.tokenizer, self.addon, list(texts), batch_size=self.compress_batch)
        anchors = [self.anchors(s) for s in subjects] if subjects is not None and self.mention_gate else None
        relations = None
        if anchors is not None:  # kept with the row even while no relation gate reads them
            asked = prompts if prompts is not None else [None] * len(texts)
            relations = [relation_text(p or t, s) if s else None for p, t, s in zip(asked, texts, subjects)]
        forms = [answer_forms(self.tokenizer, a) for a in answers] if answers is not None else None
        self.pool.append(list(fact_ids), gists, scopes=scopes, anchors=anchors, relations=relations, answers=forms)

    def anchors(self, subject: str | None) -> list[list[int]]:
        """The token-id sequences by which a query mentions `subject`: at the start of a text or after a
        space, with its first letter as given or case-flipped ("the Beatles" / "The Beatles")."""
        subject = " ".join((subject or "").split())
        if not subject:
            return []
        forms = sorted({subject, subject[0].swapcase() + subject[1:]})
        return token_forms(self.tokenizer, [text for form in forms for text in (form, " " + form)])

    def remove(self, fact_id) -> None:
        self.pool.remove(fact_id)

    def set_answers(self, answers: dict) -> None:
        """Give rows their fact's answer (fact id -> answer text) for the answer copy."""
        for fact_id, answer in answers.items():
            self.pool.set_answers(fact_id, answer_forms(self.tokenizer, answer))

    @contextmanager
    def reading(self, user_id: str | None = None, read: set | None = None):
        """Forwards inside read the global rows plus `user_id`'s. `read`: a set that gets, on exit, the fact ids
        of the rows some forward inside let a sequence read (after the gates and the answer copy's hiding). A
        reading nested inside records only for itself: its row indices are of its own view."""
        runtime = self.addon.runtime
        view = self.pool.view(user_id)  # bound below as it is: `runtime.reads` indexes its rows
        previous, runtime.reads = runtime.reads, set() if read is not None else None
        try:
            with self.addon.use(view):
                yield self
        finally:
            rows, runtime.reads = runtime.reads, previous
            if read is not None:
                read.update(view.fact_ids[i] for i in rows)

    @property
    def tag(self) -> str:
        """The add-on's fingerprint: a pool's tag says which add-on compressed its gists."""
        return self._addon_fingerprint()

    def save(self, path: str | Path) -> Path:
        self.pool.tag = self.tag  # which add-on compressed these gists
        return self.pool.save(path)

    def load(self, path: str | Path) -> bool:
        """Read the pool file; False (and the pool left as it was) when another add-on compressed it."""
        return self.adopt(GistPool.load(path, self.addon.gist_embedding.device), path)

    def adopt(self, pool: GistPool, source: str | Path) -> bool:
        """Serve `pool` (read from `source`); False, and the pool left as it was, when another add-on compressed
        it: its gists would be read wrongly, and the caller compresses the facts again (editors/gist_state does)."""
        if pool.tag != self.tag:
            log.warning("gist pool %s was compressed by another gist add-on; its %d facts will be compressed "
                        "again", source, len(pool))
            return False
        self.pool = pool
        return True

    def _addon_fingerprint(self) -> str:
        # hashed once (~0.1 s on the default add-on): the add-on is frozen while it serves a store
        if self._fingerprint is None:
            self._fingerprint = self.addon.fingerprint()
        return self._fingerprint

    def close(self) -> None:
        self.addon.runtime.relation_check = None
        self.addon.runtime.answer_copy, self.addon.runtime.word_continuing = True, None
        self.addon.detach()
