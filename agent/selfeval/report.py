"""The curves of periodic self-evaluation, drawn from the store (`engram report`).

Reads only: the agent's eval run (found by the meta key `selfeval_run_id`) and its eval_points, so it
works on the store of a running agent as well as a finished one. Writes into the output folder: one PNG
of every rate together (`plot-rates.png`), one per metric, `selfeval.csv` (one row per point) and
`report.html` (the table and the plots, embedded).
"""
from __future__ import annotations

import base64
import csv
import html
import json
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from agent.selfeval.evaluator import METHOD, RUN_KEY
from memory.errors import NotFoundError
from memory.models import EvalPoint, EvalRun, Meta
from memory.store import FactStore

# Drawn in this order; any other stored metric is drawn after them. retention_n is a count: table only.
ORDER = ("retention_tf", "retention_gen", "locality", "locality_gen", "fluency", "eval_seconds")
RATES = {"retention_tf", "retention_gen", "locality", "locality_gen"}  # fractions in [0, 1]
NOT_PLOTTED = {"retention_n"}
LABELS = {"retention_tf": "retention (teacher-forced)", "retention_gen": "retention (greedy exact match)",
          "locality": "locality (teacher-forced, vs base)", "locality_gen": "locality (greedy answer unchanged)",
          "fluency": "fluency, (2/3)·H2 + (4/3)·H3 bits", "eval_seconds": "seconds per self-evaluation"}


@dataclass
class AgentCurves:
    run_id: int
    model: str
    created_at: str
    settings: dict
    points: list[dict]  # per n_edits, ascending: {"n_edits": n, metric: value, ...}

    def metrics(self) -> list[str]:
        seen = {k for p in self.points for k in p if k != "n_edits"}
        return [m for m in ORDER if m in seen] + sorted(seen - set(ORDER))


def read_curves(store: FactStore) -> AgentCurves:
    """The agent run and its points; NotFoundError when the agent has measured nothing yet."""
    with store.transaction() as s:
        meta = s.get(Meta, RUN_KEY)
        row = s.get(EvalRun, int(meta.value)) if meta is not None and meta.value.isdigit() else None
        if row is None:
            raise NotFoundError("no self-evaluation in this store yet: run the agent with `engram run --eval-every N`")
        found = s.execute(select(EvalPoint.n_edits, EvalPoint.metric, EvalPoint.value)
                          .where(EvalPoint.run_id == row.id, EvalPoint.method == METHOD)
                          .order_by(EvalPoint.n_edits, EvalPoint.id)).all()
        curves = AgentCurves(row.id, row.model, row.created_at.isoformat() if row.created_at else "",
                             dict(row.settings or {}), [])
    by_n: dict[int, dict] = {}
    for n, metric, value in found:
        if value is not None:
            by_n.setdefault(n, {"n_edits": n})[metric] = value
    curves.points = [by_n[n] for n in sorted(by_n)]
    if not curves.points:
        raise NotFoundError(f"the agent's evaluation run {row.id} has no points yet (the first comes after "
                            f"{curves.settings.get('every', 'N')} applied facts)")
    return curves


def write_plots(out: Path, curves: AgentCurves) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from evaluation.report import save_plot  # here, not at the top: evaluation.report loads torch

    paths = []
    rates = [m for m in curves.metrics() if m in RATES]
    if rates:  # the overview: every rate on one axis
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for metric in rates:
            xs, ys = zip(*[(p["n_edits"], p[metric]) for p in curves.points if metric in p])
            ax.plot(xs, ys, marker="o", markersize=3, label=LABELS.get(metric, metric))
        ax.set_ylim(-0.02, 1.02)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("applied facts")
        ax.set_title("retention and locality as facts stream in", fontsize=9)
        paths.append(save_plot(fig, ax, out, "rates"))
    for metric in (m for m in curves.metrics() if m not in NOT_PLOTTED):
        xs, ys = zip(*[(p["n_edits"], p[metric]) for p in curves.points if metric in p])
        fig, ax = plt.subplots(figsize=(5, 3.4))
        ax.plot(xs, ys, marker="o", markersize=3, label="agent")
        base = curves.settings.get("base_fluency")
        if metric == "fluency" and isinstance(base, (int, float)):
            ax.axhline(base, linestyle="--", color="grey", linewidth=1, label="base model")
        if metric in RATES:
            ax.set_ylim(-0.02, 1.02)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # n_edits counts facts
        ax.set_xlabel("applied facts")
        ax.set_ylabel(metric)
        ax.set_title(LABELS.get(metric, metric), fontsize=9)
        paths.append(save_plot(fig, ax, out, metric))
    return paths


def write_csv(path: Path, curves: AgentCurves) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["n_edits", *curves.metrics()])
        writer.writeheader()
        writer.writerows(curves.points)


def _cell(value) -> str:
    return "–" if value is None else f"{value:.3f}" if isinstance(value, float) else html.escape(str(value))


def write_html(path: Path, curves: AgentCurves, plots: list[Path]) -> None:
    cols = curves.metrics()
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["n_edits", *cols])
    body = "".join("<tr>" + "".join(f"<td>{_cell(p.get(c))}</td>" for c in ["n_edits", *cols]) + "</tr>"
                   for p in curves.points)
    images = "".join(
        f'<figure><img src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        f"<figcaption>{html.escape(p.stem)}</figcaption></figure>" for p in plots)
    settings = html.escape(json.dumps(curves.settings, indent=2, default=str))
    last = curves.points[-1]["n_edits"]
    path.write_text(f"""<!doctype html><html><head><meta charset="utf-8"><title>Engram agent self-evaluation</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
figure{{display:inline-block;margin:8px}}</style></head><body>
<h1>Engram agent: periodic self-evaluation</h1>
<p>Evaluation run {curves.run_id}, model <b>{html.escape(curves.model)}</b>, since {html.escape(curves.created_at)};
{len(curves.points)} points, the latest at {last} applied facts. Retention: a seeded sample of learned facts,
teacher-forced and greedy (never mixed). Locality: the fixed probe set against the base model's cached
answers. Fluency: (2/3)·H2 + (4/3)·H3 of fixed continuations; the dashed line is the base model's.</p>
<table><tr>{head}</tr>{body}</table>
<h2>Curves</h2>{images}
<h2>Settings</h2><pre>{settings}</pre></body></html>""", encoding="utf-8")


def write_report(store: FactStore, out: str | Path) -> dict:
    """PNGs, selfeval.csv and report.html of the agent's curves in `out`; what was written."""
    curves = read_curves(store)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plots = write_plots(out, curves)
    write_csv(out / "selfeval.csv", curves)
    write_html(out / "report.html", curves, plots)
    return {"run_id": curves.run_id, "model": curves.model, "points": curves.points,
            "out": str(out), "plots": [str(p) for p in plots], "html": str(out / "report.html"),
            "csv": str(out / "selfeval.csv")}
