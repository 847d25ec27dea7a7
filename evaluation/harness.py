"""Continual-editing evaluation: every method on the same stream of cases, with the same model.

Protocols (DESIGN §1.4):
- `single`: learn one case, measure it, undo;
- `sequential`: learn cases one after another and measure each right after its own edit (gap-0, the
  ICE paper's Table 6); after the last edit every case is measured again (retention);
- `retention`: learn all N, then measure every case.
`every=K` adds curve points: after every K edits all cases learned so far are re-measured
(teacher-forced metrics), as in the ICE paper's Figure 2.

A run is resumable: each measured case is appended to `points-METHOD.jsonl`, and weight states are
saved after each case, so a killed run picks up at the first case it had not finished.
"""
from __future__ import annotations

import contextlib
import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from evaluation.datasets import EditCase, load_dataset
from evaluation.measure import BaseCache, CaseScore, Scorer, aggregate
from evaluation.methods import METHODS, ContextsFn, Method

log = logging.getLogger(__name__)

PROTOCOLS = ("single", "sequential", "retention")


@dataclass
class EvalConfig:
    dataset: str
    out: str
    methods: list[str] = field(default_factory=lambda: ["base", "ftm", "ice", "gist", "icl", "rag"])
    n: int = 100
    format: str = "auto"
    protocol: str = "sequential"
    every: int | None = None
    seed: int = 0
    batch_size: int = 8
    gen_tokens: int = 12
    fluency_n: int = 10  # fluency and pplr are measured on the first N cases (100 tokens each)
    fluency_tokens: int = 100
    generation: bool = True  # False: teacher-forced metrics only (greedy answers cost most of a large run)
    measure_n: int | None = None  # retention: measure only the first M cases (all N are still learned)
    retention: bool = True  # sequential: also re-measure every case after the last edit (False: gap-0 only)
    rag_k: int = 10
    gist_addon: str | None = None  # a trained gist add-on directory (None: the shipped one)

    def __post_init__(self) -> None:
        from memory.errors import ConfigError

        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"unknown protocol {self.protocol!r}: use {', '.join(PROTOCOLS)}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ConfigError(f"unknown method(s) {', '.join(unknown)}: choose from {', '.join(METHODS)}")
        if self.n < 1 or (self.every is not None and self.every < 1) or (self.measure_n is not None and self.measure_n < 1):
            raise ConfigError("--n, --every and --measure-n must be at least 1")


@dataclass
class MethodRun:
    """Everything measured for one method: per-case scores (gap-0 or after all), curve, timings."""

    name: str
    available: bool = True
    reason: str | None = None
    scores: list[CaseScore] = field(default_factory=list)
    retention: list[CaseScore] = field(default_factory=list)
    curve: list[dict] = field(default_factory=list)
    seconds_per_edit: list[float] = field(default_factory=list)
    failed_edits: int = 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


class Harness:
    def __init__(self, config: EvalConfig, loaded, contexts_fn: ContextsFn | None = None, progress=None,
                 **method_options):
        self.config, self.loaded = config, loaded
        self.method_options = method_options  # e.g. embedder= for RAG, editor_overrides= for ICE/FT-M
        self.out = Path(config.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.contexts_fn = contexts_fn
        self.progress = progress or (lambda it, **kw: it)
        self.cases: list[EditCase] = [c for c in load_dataset(config.dataset, config.format, limit=None) if c.editable][: config.n]
        self.base_cache = BaseCache.open(self.out / "base-cache.json", loaded, self.cases, config.batch_size)
        self.scorer = Scorer(loaded.model, loaded.tokenizer, self.base_cache, config)

    # -- one method -------------------------------------------------------------------------------
    def run_method(self, name: str) -> MethodRun:
        seed_everything(self.config.seed)
        method = METHODS[name](self.loaded.model, self.loaded.tokenizer, contexts_fn=self.contexts_fn,
                               rag_k=self.config.rag_k, model_name=self.loaded.name,
                               **{"gist_addon": self.config.gist_addon, **self.method_options})
        reason = method.unavailable()
        if reason:
            log.warning("%s: %s", name, reason)
            return MethodRun(name, available=False, reason=reason)
        run = MethodRun(name)
        points = self.out / f"points-{name}.jsonl"
        start_at = self._resume(method, run, points)
        from editors.prefix_cache import reuse_prefixes

        try:
            with reuse_prefixes() if method.stable_prefixes else contextlib.nullcontext():
                self._stream(method, run, points, start_at)
                if self.config.protocol == "retention" or (self.config.protocol == "sequential" and self.config.retention):
                    run.retention = self._retention(method, start_at, run)
            self._pplr(method, run)
        finally:
            method.reset()
        return run

    def _stream(self, method: Method, run: MethodRun, points: Path, start_at: int) -> None:
        cfg = self.config
        bar = self.progress(range(start_at, len(self.cases)), desc=f"{method.name} [{cfg.protocol}]",
                            unit=" case", initial=start_at, total=len(self.cases))
        for i in bar:
            case = self.cases[i]
            token = method.checkpoint() if cfg.protocol == "single" else None
            learned = method.learn(case)
            run.seconds_per_edit.append(learned.seconds / max(1, len(case.edits)))
            run.failed_edits += not learned.ok
            score = None
            if cfg.protocol != "retention":
                score = self.scorer.score(method, case, generation=cfg.generation, with_fluency=i < cfg.fluency_n)
                run.scores.append(score)
            if cfg.protocol == "single":
                method.restore(token)
            record = {"i": i, "learn": asdict(learned), "score": score.to_json() if score else None}
            if cfg.every and (i + 1) % cfg.every == 0 and cfg.protocol != "single":
                scores = self._measure_all(method, self.cases[: i + 1], desc=None, generation=False)
                record["curve"] = {"n_edits": i + 1, **aggregate(scores)}
                run.curve.append(record["curve"])
            with open(points, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
            method.save_state(self.out / f"state-{method.name}.safetensors")
            if hasattr(bar, "set_postfix_str"):
                bar.set_postfix_str(f"case {case.case_id}")

    def _retention(self, method: Method, start_at: int, run: MethodRun) -> list[CaseScore]:
        """Every case measured after the last edit; kept on disk, so a resumed finished run reuses it."""
        path = self.out / f"retention-{method.name}.jsonl"
        cases = self.cases[: self.config.measure_n] if self.config.measure_n else self.cases
        if not method.learns and [s.case_id for s in run.scores] == [c.case_id for c in cases]:
            return [CaseScore.from_json({**s.to_json(), "fluency": None, "pplr": None, "continuation": None})
                    for s in run.scores]  # nothing was learned: the same model on the same prompts
        if start_at == len(self.cases) and path.exists():
            kept = [CaseScore.from_json(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
            if [s.case_id for s in kept] == [c.case_id for c in cases]:
                return kept
        scores = self._measure_all(method, cases, desc=f"{method.name} retention", generation=self.config.generation)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(s.to_json()) + "\n" for s in scores))
        tmp.replace(path)
        return scores

    def _measure_all(self, method: Method, cases: Sequence[EditCase], desc: str | None,
                     generation: bool = True) -> list[CaseScore]:
        items = self.progress(cases, desc=desc, unit=" case", leave=False) if desc else cases
        return [self.scorer.score(method, c, generation=generation, with_fluency=False) for c in items]

    def _pplr(self, method: Method, run: MethodRun) -> None:
        """PPL_r scores generated text with the *base* model, so it runs after the method is reset."""
        method.reset()
        for score in run.scores:
            if score.continuation is not None:
                score.pplr = self.scorer.pplr(score)

    def _resume(self, method: Method, run: MethodRun, points: Path) -> int:
        """Reload what a killed run had finished; returns the first case to do."""
        state = self.out / f"state-{method.name}.safetensors"
        if not points.exists():
            return 0
        records = [json.loads(line) for line in points.read_text().splitlines() if line.strip()]
        if records and method.name in ("ice", "ftm") and not state.exists():
            records = []  # the weights after those cases were not saved: start over
        done = len(records)
        if done == 0 or done > len(self.cases):
            points.unlink()
            return 0
        method.load_state(state, self.cases[:done])
        for rec in records:
            run.seconds_per_edit.append(rec["learn"]["seconds"] / max(1, len(self.cases[rec["i"]].edits)))
            run.failed_edits += not rec["learn"]["ok"]
            if rec["score"]:
                run.scores.append(CaseScore.from_json(rec["score"]))
            if rec.get("curve"):
                run.curve.append(rec["curve"])
        log.info("%s: resuming after %d finished cases", method.name, done)
        return done

    # -- everything -------------------------------------------------------------------------------
    def run(self) -> dict[str, MethodRun]:
        runs: dict[str, MethodRun] = {}
        for name in self.config.methods:
            started = time.perf_counter()
            runs[name] = self.run_method(name)
            log.info("%s finished in %.1f s", name, time.perf_counter() - started)
        return runs
