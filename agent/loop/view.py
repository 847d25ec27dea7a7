"""What `engram run` shows: a plain line per fact (a pipe, a log file), JSON lines (--json), or a live
view on a terminal (rich): facts per minute, the queue by stage, the route mix, the model version."""
from __future__ import annotations

import json
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Protocol, TextIO

from memory.stages import STAGES

RATE_WINDOW_S = 60.0
RECENT_LINES = 8


@dataclass(frozen=True)
class FactReport:
    fact_id: int
    stage: str  # applied | failed | dropped, or where a failed attempt waits
    route: str | None
    reason: str | None  # the router's
    trail: list[str]  # the stages this process moved it through
    seconds: float  # from this process's first claim of the fact to this report
    attempts: int
    error: str | None
    model_version: int
    recovered: bool = False  # completed from a previous run's records (no step of ours)
    verified: bool | None = None  # the check of its own prompt: gave the target, did not, or none made

    def line(self) -> str:
        head = f"fact {self.fact_id} {self.stage}"
        if self.route:
            head += f" via {self.route}"
        parts = [head, " -> ".join(self.trail), f"{self.seconds:.2f} s", f"model v{self.model_version}"]
        if self.verified is not None:
            parts.append("verified" if self.verified else "not learned")
        if self.recovered:
            parts.append("(recovered from the last run)")
        if self.reason:
            parts.append(f"({self.reason})")
        if self.error:
            parts.append(f"error: {self.error}")
        return "  ".join(parts)


@dataclass(frozen=True)
class Snapshot:
    stages: dict[str, int]
    routes: dict[str, int]
    model_version: int
    pool: int | None = None  # facts in the gist pool, once it is open
    evaluating: bool = False  # whether this run measures itself (--eval-every)
    last_eval: dict | None = None  # its newest point: {"n_edits": n, metric: value, ...}


LIVE_METRICS = ("retention_tf", "retention_gen", "locality", "fluency")


def eval_text(snap: Snapshot | None) -> str:
    if snap is None or not snap.evaluating:
        return "none (periodic evaluation is off: --eval-every N)"
    point = snap.last_eval
    if not point:
        return "none yet"
    values = "  ".join(f"{k} {point[k]:.3f}" for k in LIVE_METRICS if point.get(k) is not None)
    return f"at {point['n_edits']} applied: {values}"


class View(Protocol):
    live: bool  # whether it wants a Snapshot every round (costs a query)

    def fact(self, report: FactReport) -> None: ...

    def retry(self, report: FactReport, max_attempts: int) -> None: ...

    def rejected(self, source: str, line: int, reason: str) -> None: ...

    def note(self, text: str) -> None: ...

    def tick(self, snapshot: Snapshot) -> None: ...

    def close(self, summary: dict) -> None: ...


def _retry_text(report: FactReport, max_attempts: int) -> str:
    return (f"fact {report.fact_id}: attempt {report.attempts} of {max_attempts} failed ({report.error}); "
            f"it waits at {report.stage} for a retry")


def summary_text(summary: dict) -> str:
    routes = ", ".join(f"{k} {v}" for k, v in sorted(summary["routes"].items())) or "none"
    return (f"stopped ({summary['stopped']}): stored {summary['stored']}, applied {summary['applied']} "
            f"(routes: {routes}), failed {summary['failed']}, dropped {summary['dropped']}, rejected "
            f"{summary['rejected']} lines; model version {summary['model_version']}" + _checks_text(summary))


def _checks_text(summary: dict) -> str:
    if not any(summary.get(k) for k in ("verified", "not_learned", "retried")):
        return ""
    return (f"; checked: verified {summary.get('verified', 0)}, not learned {summary.get('not_learned', 0)}, "
            f"retried on the other route {summary.get('retried', 0)}")


@dataclass
class LogView:
    """One plain line per fact on `out`; rejected lines and notes on `err`."""

    out: TextIO = field(default_factory=lambda: sys.stdout)
    err: TextIO = field(default_factory=lambda: sys.stderr)
    live: bool = False

    def _print(self, text: str, stream: TextIO) -> None:
        print(text, file=stream, flush=True)

    def fact(self, report: FactReport) -> None:
        self._print(report.line(), self.out)

    def retry(self, report: FactReport, max_attempts: int) -> None:
        self._print(_retry_text(report, max_attempts), self.err)

    def rejected(self, source: str, line: int, reason: str) -> None:
        self._print(f"{source} line {line}: {reason}", self.err)

    def note(self, text: str) -> None:
        self._print(text, self.err)

    def tick(self, snapshot: Snapshot) -> None:
        pass

    def close(self, summary: dict) -> None:
        self._print(summary_text(summary), self.err)


@dataclass
class JsonView:
    """One JSON object per line on `out`, each with an "event": fact, retry, rejected, note, stopped."""

    out: TextIO = field(default_factory=lambda: sys.stdout)
    live: bool = False

    def _emit(self, payload: dict) -> None:
        print(json.dumps(payload, default=str), file=self.out, flush=True)

    def fact(self, report: FactReport) -> None:
        self._emit({"event": "fact", **asdict(report), "seconds": round(report.seconds, 3)})

    def retry(self, report: FactReport, max_attempts: int) -> None:
        self._emit({"event": "retry", **asdict(report), "max_attempts": max_attempts})

    def rejected(self, source: str, line: int, reason: str) -> None:
        self._emit({"event": "rejected", "source": source, "line": line, "reason": reason})

    def note(self, text: str) -> None:
        self._emit({"event": "note", "text": text})

    def tick(self, snapshot: Snapshot) -> None:
        pass

    def close(self, summary: dict) -> None:
        self._emit({"event": "stopped", **summary})


class LiveView:
    """A rich panel redrawn every round, with the latest lines under it."""

    live = True

    def __init__(self, console=None):
        from rich.console import Console
        from rich.live import Live

        self.console = console or Console(stderr=False)
        self.started = time.monotonic()
        self.applied: deque[float] = deque()
        self.recent: deque[str] = deque(maxlen=RECENT_LINES)
        self.snapshot: Snapshot | None = None
        self._live = Live(self.render(), console=self.console, auto_refresh=False, transient=False)
        self._live.start()

    def per_minute(self) -> float:
        now = time.monotonic()
        while self.applied and now - self.applied[0] > RATE_WINDOW_S:
            self.applied.popleft()
        window = min(RATE_WINDOW_S, max(now - self.started, 1.0))
        return len(self.applied) * 60.0 / window

    def render(self):
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold")
        table.add_column()
        snap = self.snapshot
        table.add_row("facts/min", f"{self.per_minute():.1f}")
        if snap is not None:
            table.add_row("queue", "  ".join(f"{name} {snap.stages.get(name, 0)}" for name in STAGES))
            table.add_row("routes", "  ".join(f"{k} {v}" for k, v in sorted(snap.routes.items())) or "none yet")
            pool = "" if snap.pool is None else f"   gist pool {snap.pool} facts"
            table.add_row("model", f"version {snap.model_version}{pool}")
        table.add_row("last eval", eval_text(snap))
        return Group(Text("engram run", style="bold cyan"), table, Text("\n".join(self.recent), style="dim"))

    def _redraw(self) -> None:
        self._live.update(self.render(), refresh=True)

    def fact(self, report: FactReport) -> None:
        if report.stage == "applied":
            self.applied.append(time.monotonic())
        self.recent.append(report.line())
        self._redraw()

    def retry(self, report: FactReport, max_attempts: int) -> None:
        self.recent.append(_retry_text(report, max_attempts))
        self._redraw()

    def rejected(self, source: str, line: int, reason: str) -> None:
        self.recent.append(f"{source} line {line}: {reason}")
        self._redraw()

    def note(self, text: str) -> None:
        self.recent.append(text)
        self._redraw()

    def tick(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self._redraw()

    def close(self, summary: dict) -> None:
        self._redraw()
        self._live.stop()
        self.console.print(summary_text(summary))


def make_view(json_mode: bool, out: TextIO | None = None) -> View:
    """JSON lines with --json; plain lines when stdout is not a terminal (or rich is missing); else live."""
    out = out or sys.stdout
    if json_mode:
        return JsonView(out)
    if not out.isatty():
        return LogView(out)
    try:
        return LiveView()
    except ImportError:  # rich is optional: the plain log works everywhere
        return LogView(out)
