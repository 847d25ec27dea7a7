"""Continual-editing evaluation: every method on the same stream of cases, with the same model.

Protocols (DESIGN §1.4):
- `single`: learn one case, measure it, undo;
- `sequential`: learn cases one after another and measure each right after its own edit (gap-0, the
  ICE paper's Table 6); after the last edit every case is measured again (retention);
- `retention`: learn all N, then measure every case.
`every=K` adds curve points: after every K edits all cases learned so far are re-measured
(teacher-forced metrics), as in the ICE paper's Figure 2.

A run is resumable, exactly: after each case the weight state is saved (atomically, with the number of
cases it holds and that case's record), then the case's record is appended to `points-METHOD.jsonl`
and synced. A kill between the two leaves the state one case ahead, and the resume writes the missing
record from the state, so no edit is lost or applied twice. `run.json` holds the settings the results
depend on; a resume with other settings is refused.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from evaluation.datasets import EditCase, load_dataset
from evaluation.measure import BaseCache, CaseScore, Scorer, aggregate
from evaluation.methods import METHODS, ContextsFn, Method
from memory.atomic import atomic_write
from memory.errors import ConfigError, ValidationError

log = logging.getLogger(__name__)

PROTOCOLS = ("single", "sequential", "retention")
MANIFEST = "run.json"
# EvalConfig fields that change what is measured. Left out: methods (each has its own points file),
# format (the case hash covers it), out, and batch_size (padding moves floats in the last bits only).
RESULT_FIELDS = ("n", "offset", "protocol", "every", "seed", "gen_tokens", "fluency_n", "fluency_tokens", "generation",
                 "measure_n", "retention", "rag_k", "gist_addon")


@dataclass
class EvalConfig:
    dataset: str
    out: str
    methods: list[str] = field(default_factory=lambda: ["base", "ftm", "ice", "gist", "icl", "rag"])
    n: int = 100
    offset: int = 0  # skip the first K editable cases: a slice of the file that no earlier run touched
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
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"unknown protocol {self.protocol!r}: use {', '.join(PROTOCOLS)}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ConfigError(f"unknown method(s) {', '.join(unknown)}: choose from {', '.join(METHODS)}")
        if self.offset < 0:
            raise ConfigError("--offset must be at least 0")
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


# -- the files of a run ---------------------------------------------------------------------------
def append_point(path: Path, record: dict) -> None:
    """One record, one line, synced: once this returns the case counts as done."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _write_lines(path: Path, lines: Sequence[bytes]) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(b"".join(line + b"\n" for line in lines)))


def _check_record(line: bytes, expected: int) -> tuple[dict | None, str]:
    try:
        record = json.loads(line)
    except ValueError as exc:  # UnicodeDecodeError is a ValueError too
        return None, f"not JSON ({exc})"
    if not isinstance(record, dict) or not {"i", "learn", "score"} <= set(record) \
            or not isinstance(record["learn"], dict):
        return None, "not a points record (it needs i, learn and score)"
    if record["i"] != expected:
        return None, f"it is case {record['i']!r}, expected case {expected}"
    return record, ""


def read_points(path: Path) -> list[dict]:
    """The records of a points file, in case order. A torn last line (a kill mid-write) is dropped with a
    warning and cut from the file, so the next append starts on a clean line; a bad line before the last
    is refused, since dropping it would lose a case from the middle of the stream."""
    chunks = path.read_bytes().split(b"\n")
    numbered = [(n, line) for n, line in enumerate(chunks, 1) if line.strip()]
    kept: list[bytes] = []
    records: list[dict] = []
    for k, (number, line) in enumerate(numbered):
        record, why = _check_record(line, len(records))
        if record is None:
            if k < len(numbered) - 1:
                raise ValidationError(f"{path}: line {number} is corrupt: {why}; delete the file to start "
                                      f"this method over, or use a new --out")
            log.warning("%s: dropping a torn last line %d (%s); that case is done again", path, number, why)
            break
        records.append(record)
        kept.append(line)
    if len(kept) != len(chunks) - 1 or chunks[-1]:  # something dropped, a blank line, or no final newline
        _write_lines(path, kept)
    return records


def _state_meta(path: Path) -> dict[str, str] | None:
    """The metadata of a saved weight state (None when there is none, or it cannot be read)."""
    if not path.exists():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as fh:
            return fh.metadata() or {}
    except Exception as exc:  # an unreadable state is redone, never trusted
        log.warning("%s cannot be read (%s)", path, exc)
        return None


def _describe(value) -> object:
    """A setting as JSON: plain values as they are, objects (an add-on, an embedder) by their type."""
    try:
        json.dumps(value, sort_keys=True)
        return value
    except (TypeError, ValueError):
        return f"<{type(value).__name__}>"


def cases_digest(cases: Sequence[EditCase]) -> str:
    return hashlib.sha256(json.dumps([asdict(c) for c in cases], sort_keys=True, default=str).encode()).hexdigest()


def _show(key: str, value) -> str:
    if key == "cases_sha256" and isinstance(value, str):
        return f"cases sha256 {value[:12]}"
    return f"{key}={value if isinstance(value, str) else json.dumps(value, sort_keys=True)}"


def check_manifest(out: Path, settings: dict) -> None:
    """Write `run.json` on the first start; on a resume refuse settings other than those it holds."""
    path = out / MANIFEST
    if not path.exists():
        if any(out.glob("points-*.jsonl")):
            log.warning("%s has points but no %s (an older run): its settings cannot be checked", out, MANIFEST)
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n"))
        return
    try:
        started = json.loads(path.read_text())
    except ValueError as exc:
        raise ConfigError(f"{path} is not JSON ({exc}); use a new --out") from exc
    keys = [k for k in settings if k != "dataset" and started.get(k) != settings[k]]
    keys += [k for k in started if k not in settings]
    if "n" in keys and "cases_sha256" in keys:
        keys.remove("cases_sha256")  # another n uses other cases: saying so twice would only confuse
    if keys:
        was = ", ".join(_show(k, started.get(k)) for k in keys)
        now = ", ".join(_show(k, settings.get(k)) for k in keys)
        where = f" (it read {started.get('dataset')})" if "cases_sha256" in keys else ""
        raise ConfigError(f"{out}/ was started with {was}{where}, this run has {now}; "
                          f"use a new --out or the same settings")


class Harness:
    def __init__(self, config: EvalConfig, loaded, contexts_fn: ContextsFn | None = None, progress=None,
                 contexts_name: str | None = None, **method_options):
        """`contexts_name` names where `contexts_fn` comes from (the CLI's --contexts), for run.json."""
        self.config, self.loaded = config, loaded
        self.method_options = method_options  # e.g. embedder= for RAG, editor_overrides= for ICE/FT-M
        self.out = Path(config.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.contexts_fn = contexts_fn
        self.progress = progress or (lambda it, **kw: it)
        self.cases: list[EditCase] = [c for c in load_dataset(config.dataset, config.format, limit=None) if c.editable][config.offset: config.offset + config.n]
        if not self.cases:
            raise ConfigError(f"{config.dataset} has no editable cases after the first {config.offset}")
        contexts = "none" if contexts_fn is None else (contexts_name or "custom")
        check_manifest(self.out, self.settings(contexts))
        self.base_cache = BaseCache.open(self.out / "base-cache.json", loaded, self.cases, config.batch_size)
        self.scorer = Scorer(loaded.model, loaded.tokenizer, self.base_cache, config)

    def settings(self, contexts: str) -> dict:
        """What the results depend on: kept in run.json and compared on every resume."""
        return {**{k: getattr(self.config, k) for k in RESULT_FIELDS}, "model": self.loaded.name,
                "dataset": str(self.config.dataset), "cases_sha256": cases_digest(self.cases),
                "contexts": contexts,
                "method_options": {k: _describe(v) for k, v in sorted(self.method_options.items())}}

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

    def _state_path(self, method: Method) -> Path:
        return self.out / f"state-{method.name}.safetensors"

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
            # the state first, carrying this record: a kill before the points line is healed from it
            method.save_state(self._state_path(method),
                              {"cases": str(i + 1), "case_id": case.case_id, "record": json.dumps(record)})
            append_point(points, record)
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
        atomic_write(path, lambda tmp: tmp.write_text("".join(json.dumps(s.to_json()) + "\n" for s in scores)))
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

    def _match_state(self, method: Method, points: Path, records: list[dict]) -> list[dict]:
        """The records the saved weights hold: the missing last one written from the state, or none."""
        state = self._state_path(method)
        meta = _state_meta(state)
        if meta is None and not records:
            return []
        covered = int(meta["cases"]) if meta and meta.get("cases", "").isdigit() else -1
        if meta == {} and len(records) == len(self.cases) and self._finished(method):
            return records  # an older run's state (no case count), saved after a stream that ran to its end
        if not 0 < covered <= len(self.cases) or meta.get("case_id") != self.cases[covered - 1].case_id \
                or covered > len(records) + 1:
            log.warning("%s: the saved weights do not match %s; starting this method over", method.name, points)
            state.unlink(missing_ok=True)
            return []
        if covered == len(records) + 1:  # killed after the state was saved, before its points line
            record = json.loads(meta["record"])
            append_point(points, record)
            return [*records, record]
        if covered < len(records):  # points past the weights (not written in this order): do them again
            log.warning("%s: %s is ahead of the saved weights; redoing cases from %d", method.name, points, covered)
            _write_lines(points, [json.dumps(r).encode() for r in records[:covered]])
            return records[:covered]
        return records

    def _finished(self, method: Method) -> bool:
        """Files written only once a method's stream had ended (so its last state was saved too)."""
        return (self.out / f"retention-{method.name}.jsonl").exists() or (self.out / "results.json").exists()

    def _resume(self, method: Method, run: MethodRun, points: Path) -> int:
        """Reload what a killed run had finished; returns the first case to do."""
        records = read_points(points) if points.exists() else []
        if method.saves_state:
            records = self._match_state(method, points, records)
        done = len(records)
        if done == 0 or done > len(self.cases):
            points.unlink(missing_ok=True)
            return 0
        method.load_state(self._state_path(method), self.cases[:done])
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
