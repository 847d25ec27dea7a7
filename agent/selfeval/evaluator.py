"""Periodic self-evaluation of the running agent (`engram run --eval-every N`, issue 22 item 5).

Every N applied facts the agent measures itself and stores one `eval_points` row per metric:
- retention on a seeded sample of up to K learned facts (active, with an applied edit, either route):
  `retention_tf` (teacher-forced accuracy of the target given the prompt) and `retention_gen` (greedy
  exact match at the start), with `retention_n`, the sample's size;
- locality on the fixed probe set (agent/selfeval/probes.py) against the base model's cached answers:
  `locality` (teacher-forced argmax agreement, as `engram eval` scores it) and `locality_gen` (the short
  greedy answer is unchanged);
- `fluency`, (2/3)·H2 + (4/3)·H3 of a few generated continuations of fixed prompts;
- `eval_seconds`, what the measurement cost.

All points belong to one `eval_runs` row (protocol "agent", method "agent"), created with the first point
and found again after a restart through the store's meta key `selfeval_run_id`; `n_edits` is the
applied total the point was taken at, so a restart continues the same curve.
"""
from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass

from sqlalchemy import exists, func, select

from agent.selfeval.probes import DEFAULT_PROBES, BaseAnswers, cache_path, load_probes, open_base_answers, \
    probes_digest
from memory.errors import ConfigError
from memory.models import Edit, EvalPoint, EvalRun, Fact, Meta
from memory.store import FactStore

log = logging.getLogger(__name__)

RUN_KEY = "selfeval_run_id"  # meta key: the agent's one eval_runs row
PROTOCOL = METHOD = "agent"
GIST = "gist"


@dataclass(frozen=True)
class SelfEvalConfig:
    """What periodic self-evaluation measures, and how often; validated on construction."""

    every: int = 50  # applied facts between two points
    sample: int = 20  # K: learned facts whose retention is measured
    seed: int = 0  # of the retention sample
    fluency_n: int = 4  # generated continuations scored for fluency (0: none), decoded as one batch
    probes_path: str | None = None  # default: the project's own probes (agent/selfeval/locality_probes.jsonl)
    gen_tokens: int = 12  # cap of retention_gen's greedy budget (the longest target + 1 is used)
    locality_tokens: int = 4  # greedy budget of locality_gen: the answer's first words
    # Decoding steps are the cost (on CPU ~60-90 ms each for the 135M model, whatever the batch), and
    # fluency's were 60% of a point at 64 tokens: 32 here, not the 100 of `engram eval`, so compare the
    # curve with its own base line (cached with the same settings), not with evaluation tables.
    fluency_tokens: int = 32
    batch_size: int = 64  # one batch for each measurement at the defaults

    def __post_init__(self) -> None:
        for name in ("every", "gen_tokens", "locality_tokens", "fluency_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"self-evaluation {name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("sample", "fluency_n"):
            if getattr(self, name) < 0:
                raise ConfigError(f"self-evaluation {name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")


class SelfEvaluator:
    """Measures the live model every `config.every` applied facts; see the module doc.

    `unedited`: a zero-argument callable giving a context manager inside which the model has its base
    weights (`ModelState.unedited`). It is needed once per model fingerprint, to compute the base answers;
    without it the store must hold no applied weight edit (else ConfigError)."""

    def __init__(self, store: FactStore, model, tokenizer, config: SelfEvalConfig | None = None, *,
                 unedited: Callable[[], AbstractContextManager] | None = None, model_name: str | None = None):
        self.store, self.model, self.tokenizer = store, model, tokenizer
        self.config = config or SelfEvalConfig()
        self.unedited = unedited
        self.model_name = model_name or getattr(getattr(model, "config", None), "_name_or_path", None) or "model"
        self.probes = load_probes(self.config.probes_path)  # a bad probe file fails before the first point
        self.base_computed = False  # whether this process computed the base answers (not read them)
        self._base: BaseAnswers | None = None
        self._run: tuple[int | None, int] | None = None  # (run id, n_edits of its newest point), read once

    # -- when ---------------------------------------------------------------------------------------
    def due(self, applied_total: int) -> bool:
        """True once `applied_total` crossed a multiple of `every` that has no point yet. Facts settle in
        batches (a gist batch), so the test is "a new multiple was passed", not "is a multiple"."""
        every = self.config.every
        return applied_total >= every and applied_total // every > self._state()[1] // every

    def maybe_run(self, applied_total: int, reading: AbstractContextManager | None = None) -> dict | None:
        """Measure and store a point when one is due (see `due`); the point's values, or None.

        `reading`: a context manager the measurement runs inside (the gist pool's `memory.reading()`, so
        facts learned by the pool are read from it); entered once. The base answers never see it."""
        if not self.due(applied_total):
            return None
        return self.run(applied_total, reading)

    def run(self, applied_total: int, reading: AbstractContextManager | None = None) -> dict:
        """Measure now and store the point at n_edits = applied_total."""
        started = time.perf_counter()
        base = self.base_answers()  # outside `reading`: the base model never reads the pool
        facts = self.learned_sample()
        with reading if reading is not None else contextlib.nullcontext():
            values = {**self._retention(facts), **self._locality(base), "fluency": self._fluency()}
        values["eval_seconds"] = time.perf_counter() - started
        values = {k: v for k, v in values.items() if v is not None}
        self._record(applied_total, values, base)
        log.info("self-evaluation at %d applied facts: %s", applied_total,
                 ", ".join(f"{k} {v:.3f}" for k, v in values.items()))
        return {"n_edits": applied_total, **values}

    # -- the run row --------------------------------------------------------------------------------
    def _state(self) -> tuple[int | None, int]:
        if self._run is None:
            with self.store.transaction() as s:
                run_id = self._find_run(s)
                last = s.scalar(select(func.max(EvalPoint.n_edits)).where(EvalPoint.run_id == run_id)) \
                    if run_id is not None else None
            self._run = (run_id, last or 0)
        return self._run

    @property
    def run_id(self) -> int | None:
        """The agent's eval_runs row, None until the first point is stored."""
        return self._state()[0]

    def _find_run(self, s) -> int | None:
        meta = s.get(Meta, RUN_KEY)
        raw = meta.value if meta is not None else ""
        if not raw.isdigit():
            return None
        row = s.get(EvalRun, int(raw))
        return row.id if row is not None and row.protocol == PROTOCOL else None

    def _settings(self, base: BaseAnswers) -> dict:
        return {**asdict(self.config), "probes": probes_digest(self.probes), "n_probes": len(self.probes),
                "base_fluency": base.fluency}

    def _record(self, n_edits: int, values: dict, base: BaseAnswers) -> None:
        """The points and (with the first one) the run row and its meta key, in one transaction."""
        with self.store.transaction() as s:
            run_id = self._find_run(s)
            row = s.get(EvalRun, run_id) if run_id is not None else None
            if row is None:
                row = EvalRun(dataset=str(self.config.probes_path or DEFAULT_PROBES), protocol=PROTOCOL,
                              model=self.model_name, methods=[METHOD])
                s.add(row)
                s.flush()
                self.store.set_meta(RUN_KEY, str(row.id), session=s)
            settings = self._settings(base)
            if row.settings != settings:  # a restart with other flags: the row says what is measured now
                row.settings = settings
            row.status = "running"
            s.add_all(EvalPoint(run_id=row.id, method=METHOD, n_edits=n_edits, metric=name, value=float(value))
                      for name, value in values.items())
            run_id = row.id
        self._run = (run_id, max(n_edits, self._state()[1]))

    # -- the base answers ---------------------------------------------------------------------------
    def base_answers(self) -> BaseAnswers:
        """The base model's answers to the probes: from the data dir's cache, else computed once."""
        if self._base is None:
            from editors.fingerprint import model_fingerprint

            fingerprint = model_fingerprint(self.model, self.model_name)  # the edited model keeps its base's
            param = next(self.model.parameters())
            c = self.config
            key = {"fingerprint": fingerprint, "probes": probes_digest(self.probes), "device": param.device.type,
                   "dtype": str(param.dtype), "batch_size": c.batch_size, "locality_tokens": c.locality_tokens,
                   "fluency_n": c.fluency_n, "fluency_tokens": c.fluency_tokens}
            self._base, self.base_computed = open_base_answers(
                cache_path(self.store.data_dir, fingerprint), key, self._compute_base)
        return self._base

    def _without_edits(self) -> AbstractContextManager:
        if self.unedited is not None:
            return self.unedited()
        with self.store.transaction() as s:
            edited = s.scalar(select(exists().where(Edit.status == "applied", Edit.backend != GIST)))
        if edited:
            raise ConfigError("the base answers of the locality probes need the model without its weight edits: "
                              "pass unedited=ModelState.unedited")
        return contextlib.nullcontext()

    def _compute_base(self) -> BaseAnswers:
        from editors.answer import generate_greedy
        from evaluation import metrics

        log.info("computing the base model's answers to %d locality probes (once per model)", len(self.probes))
        c, prompts = self.config, [p.prompt for p in self.probes]
        with self._without_edits():
            argmax = metrics.argmax_tokens(self.model, self.tokenizer, prompts, [p.answer for p in self.probes],
                                           batch_size=c.batch_size)
            greedy = generate_greedy(self.model, self.tokenizer, prompts, max_new_tokens=c.locality_tokens,
                                     batch_size=c.batch_size)
            fluency = self._fluency()
        return BaseAnswers(argmax, greedy, fluency)

    # -- the measurements ---------------------------------------------------------------------------
    def learned_sample(self) -> list[Fact]:
        """A seeded sample of up to K learned facts: active, global (a user's gists are read only as that
        user), with a prompt and target, and an applied edit on either route."""
        learned = exists().where(Edit.fact_id == Fact.id, Edit.status == "applied")
        with self.store.transaction() as s:
            ids = list(s.scalars(select(Fact.id).where(Fact.status == "active", Fact.scope == "global",
                                                       Fact.prompt.is_not(None), Fact.target.is_not(None), learned)
                                 .order_by(Fact.id)))
            chosen = sorted(random.Random(self.config.seed).sample(ids, min(self.config.sample, len(ids))))
            facts = {f.id: f for f in s.scalars(select(Fact).where(Fact.id.in_(chosen)))}
        return [facts[i] for i in chosen]

    def _retention(self, facts: list[Fact]) -> dict:
        from editors.answer import generate_greedy
        from evaluation import metrics

        if not facts:
            return {"retention_n": 0.0}
        c = self.config
        prompts, targets = [f.prompt for f in facts], [f.target for f in facts]
        tf = metrics.teacher_forced_accuracy(self.model, self.tokenizer, prompts, targets, batch_size=c.batch_size)
        # one token past the longest target tells "Nairobi," from "Nairobian": more only costs decoding steps
        longest = max(len(ids) - start for ids, start in
                      (metrics.encode_target(self.tokenizer, p, t) for p, t in zip(prompts, targets)))
        outputs = generate_greedy(self.model, self.tokenizer, prompts, max_new_tokens=min(c.gen_tokens, longest + 1),
                                  batch_size=c.batch_size)
        gen = [float(metrics.exact_match_at_start(o, t)) for o, t in zip(outputs, targets)]
        return {"retention_tf": metrics.mean_or_none(tf), "retention_gen": metrics.mean_or_none(gen),
                "retention_n": float(len(facts))}

    def _locality(self, base: BaseAnswers) -> dict:
        from editors.answer import generate_greedy
        from evaluation import metrics

        c, prompts = self.config, [p.prompt for p in self.probes]
        post = metrics.argmax_tokens(self.model, self.tokenizer, prompts, [p.answer for p in self.probes],
                                     batch_size=c.batch_size)
        outputs = generate_greedy(self.model, self.tokenizer, prompts, max_new_tokens=c.locality_tokens,
                                  batch_size=c.batch_size)
        same = [float(metrics.normalize_answer(o) == metrics.normalize_answer(b)) for o, b in zip(outputs, base.greedy)]
        return {"locality": metrics.mean_or_none([metrics.locality(x, y) for x, y in zip(base.argmax, post)]),
                "locality_gen": metrics.mean_or_none(same)}

    def _fluency_prompts(self) -> list[str]:
        from evaluation.metrics import join_prompt_target

        n = min(self.config.fluency_n, len(self.probes))
        # spread over the set, and fixed: every point of the curve scores the same prompts
        return [join_prompt_target(p.prompt, p.answer) for p in
                (self.probes[i * len(self.probes) // n] for i in range(n))] if n else []

    def _fluency(self) -> float | None:
        from editors.answer import generate_greedy
        from evaluation import metrics

        heads = self._fluency_prompts()
        if not heads:
            return None
        texts = generate_greedy(self.model, self.tokenizer, heads, max_new_tokens=self.config.fluency_tokens,
                                batch_size=self.config.batch_size, stop_at_newline=False)
        return metrics.mean_or_none([metrics.fluency(t) for t in texts])

    def last_point(self) -> dict | None:
        """The newest stored point ({"n_edits": n, metric: value, ...}), for a live view; None before one."""
        return latest_point(self.store, self.run_id)


def latest_point(store: FactStore, run_id: int | None) -> dict | None:
    if run_id is None:
        return None
    with store.transaction() as s:
        n = s.scalar(select(func.max(EvalPoint.n_edits)).where(EvalPoint.run_id == run_id))
        if n is None:
            return None
        rows = s.execute(select(EvalPoint.metric, EvalPoint.value).where(
            EvalPoint.run_id == run_id, EvalPoint.n_edits == n).order_by(EvalPoint.id)).all()
    return {"n_edits": n, **dict(rows)}
