"""Measuring one case under one method: teacher-forced and generation metrics (DESIGN §1.4).

Every method is scored the same way: its `prompts()` rewrite the queries (ICL/RAG put facts in front)
and its `model` answers. Locality always compares with the *original* model's argmax on the bare probe,
which `BaseCache` computes once per (model, dataset slice) and keeps on disk.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from editors.answer import generate_greedy
from evaluation import metrics
from evaluation.datasets import EditCase

log = logging.getLogger(__name__)

METRICS = ("edit_success", "rephrase", "portability", "locality", "edit_success_gen", "portability_gen",
           "multihop", "fluency", "pplr")


@dataclass
class CaseScore:
    case_id: str
    edit_success: float | None = None
    rephrase: float | None = None
    portability: float | None = None
    locality: float | None = None
    edit_success_gen: float | None = None
    portability_gen: float | None = None
    multihop: float | None = None
    fluency: float | None = None
    pplr: float | None = None
    # kept so PPL_r can be scored by the base model once the method is reset
    prompt: str | None = None
    target: str | None = None
    continuation: str | None = None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, record: dict) -> "CaseScore":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in record.items() if k in known})


def aggregate(scores: list[CaseScore]) -> dict[str, float | None]:
    """The mean of each metric over the cases that have it (None when none has it)."""
    out: dict[str, float | None] = {}
    for name in METRICS:
        values = [getattr(s, name) for s in scores if getattr(s, name) is not None]
        out[name] = sum(values) / len(values) if values else None
    return out


class BaseCache:
    """The original model's argmax on every locality probe, computed once and kept on disk."""

    def __init__(self, path: Path, predictions: dict[str, list[list[int]]]):
        self.path, self.predictions = path, predictions

    @classmethod
    def open(cls, path: Path, loaded, cases: list[EditCase], batch_size: int) -> "BaseCache":
        probes = [(c.case_id, p.prompt, p.answer) for c in cases for p in c.locality]
        key = hashlib.sha256(json.dumps([loaded.name, probes]).encode()).hexdigest()
        from editors.model import cache_root

        shared = cache_root() / "eval" / f"base-locality-{key[:24]}.json"
        for candidate in (path, shared):
            try:
                record = json.loads(candidate.read_text())
                if record.get("key") == key:
                    return cls(path, record["predictions"])
            except (OSError, ValueError, KeyError):
                continue
        predictions: dict[str, list[list[int]]] = {c.case_id: [] for c in cases}
        if probes:
            argmax = metrics.argmax_tokens(loaded.model, loaded.tokenizer, [p for _, p, _ in probes],
                                           [a for _, _, a in probes], batch_size=batch_size)
            for (case_id, _, _), ids in zip(probes, argmax):
                predictions[case_id].append(ids)
        record = json.dumps({"key": key, "model": loaded.name, "predictions": predictions})
        for target in (path, shared):
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(".tmp")
            tmp.write_text(record)
            os.replace(tmp, target)
        return cls(path, predictions)


class Scorer:
    def __init__(self, model, tokenizer, base_cache: BaseCache, config):
        self.model, self.tokenizer, self.base_cache, self.config = model, tokenizer, base_cache, config

    def _teacher_forced(self, method, pairs: list[tuple[str, str]]) -> list[float]:
        if not pairs:
            return []
        prompts = method.prompts([q for q, _ in pairs])
        return metrics.teacher_forced_accuracy(self.model, self.tokenizer, prompts, [t for _, t in pairs],
                                               batch_size=self.config.batch_size)

    def _generate(self, method, queries: list[str], max_new_tokens: int, stop_at_newline: bool = True) -> list[str]:
        if not queries:
            return []
        return generate_greedy(self.model, self.tokenizer, method.prompts(queries), max_new_tokens=max_new_tokens,
                               batch_size=self.config.batch_size, stop_at_newline=stop_at_newline)

    def score(self, method, case: EditCase, generation: bool = True, with_fluency: bool = False) -> CaseScore:
        with method.active():
            return self._score(method, case, generation, with_fluency)

    def _score(self, method, case: EditCase, generation: bool, with_fluency: bool) -> CaseScore:
        edits = [(e.prompt, e.target) for e in case.edits]
        rephrases = [(r, case.target) for r in case.rephrases]
        portability = [(p.prompt, p.answer) for p in case.portability if p.answer]
        accs = self._teacher_forced(method, edits + rephrases + portability)
        a, b = len(edits), len(edits) + len(rephrases)
        score = CaseScore(case.case_id, edit_success=metrics.mean_or_none(accs[:a]),
                          rephrase=metrics.mean_or_none(accs[a:b]), portability=metrics.mean_or_none(accs[b:]))
        if case.locality:
            post = metrics.argmax_tokens(self.model, self.tokenizer, method.prompts([p.prompt for p in case.locality]),
                                         [p.answer for p in case.locality], batch_size=self.config.batch_size)
            pre = self.base_cache.predictions[case.case_id]
            score.locality = metrics.mean_or_none([metrics.locality(x, y) for x, y in zip(pre, post)])
        if generation:
            self._generation_metrics(method, case, score)
        if with_fluency:
            self._fluency(method, case, score)
        return score

    def _generation_metrics(self, method, case: EditCase, score: CaseScore) -> None:
        probes = [p for p in case.portability if p.answers]
        queries = [e.prompt for e in case.edits] + [p.prompt for p in probes] + [q.prompt for q in case.multihop]
        outputs = self._generate(method, queries, self.config.gen_tokens)
        n_e, n_p = len(case.edits), len(probes)
        score.edit_success_gen = metrics.mean_or_none(
            [float(metrics.exact_match_at_start(o, [e.target])) for o, e in zip(outputs[:n_e], case.edits)])
        score.portability_gen = metrics.mean_or_none(
            [float(metrics.exact_match_at_start(o, p.answers)) for o, p in zip(outputs[n_e:n_e + n_p], probes)])
        if case.multihop:
            # MQuAKE's convention: a case is answered when any of its paraphrased questions is
            answers = sorted({a for q in case.multihop for a in q.answers})
            score.multihop = metrics.multihop_accuracy([outputs[n_e + n_p:]], [answers])

    def _fluency(self, method, case: EditCase, score: CaseScore) -> None:
        head = metrics.join_prompt_target(case.prompt, case.target)
        text = self._generate(method, [head], self.config.fluency_tokens, stop_at_newline=False)[0]
        score.fluency = metrics.fluency(text)
        score.prompt, score.target, score.continuation = case.prompt, case.target, " " + text

    def pplr(self, score: CaseScore) -> float | None:
        try:
            return metrics.pplr(self.model, self.tokenizer, score.prompt, score.target, score.continuation)
        except ValueError as exc:
            log.debug("no PPL_r for %s: %s", score.case_id, exc)
            return None
