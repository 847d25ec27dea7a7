"""What an evaluation leaves behind: results.json (DESIGN §3), curve.csv, one PNG per metric, report.html,
and rows in the store's eval_runs / eval_points tables."""
from __future__ import annotations

import base64
import csv
import html
import json
import os
import platform
import statistics
from pathlib import Path

from evaluation import intervals
from evaluation.measure import METRICS, aggregate

RESULT_KEYS = ("edit_success", "rephrase", "portability", "locality", "edit_success_gen", "portability_gen",
               "fluency", "pplr", "seconds_per_edit")


def machine() -> dict:
    import torch

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def with_intervals(scores: list) -> dict:
    """aggregate() plus "ci": {metric: [low, high] | None}, the bootstrap over these same cases."""
    return {**aggregate(scores), "ci": intervals.case_intervals(scores, METRICS)}


def method_summary(run) -> dict:
    if not run.available:
        return {"available": False, "reason": run.reason, **{k: None for k in RESULT_KEYS},
                "ci": {k: None for k in METRICS}}
    main = with_intervals(run.scores if run.scores else run.retention)
    summary = {k: main.get(k) for k in RESULT_KEYS if k != "seconds_per_edit"}
    summary["seconds_per_edit"] = statistics.median(run.seconds_per_edit) if run.seconds_per_edit else None
    summary["multihop"] = main.get("multihop")
    summary["failed_edits"] = run.failed_edits
    summary["ci"] = main["ci"]  # a nested block, so readers of the flat metric keys see them unchanged
    if run.retention:
        summary["retention"] = with_intervals(run.retention)
    return summary


def build_results(config, loaded, runs: dict, seconds: float) -> dict:
    return {
        "dataset": config.dataset, "n_edits": config.n, "model": loaded.name, "protocol": config.protocol,
        "methods": {name: method_summary(run) for name, run in runs.items()},
        "intervals": intervals.describe(),
        "settings": {k: getattr(config, k) for k in ("format", "seed", "every", "batch_size", "gen_tokens",
                                                     "fluency_n", "rag_k", "generation", "measure_n", "retention",
                                                     "gist_addon")},
        "machine": machine(), "wall_seconds": round(seconds, 1),
    }


def write_json(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)


def write_curve(path: Path, runs: dict) -> list[dict]:
    rows = [{"method": name, **point} for name, run in runs.items() for point in run.curve]
    if not rows:  # without --every the curve is the running mean of the gap-0 scores
        for name, run in runs.items():
            for k in range(1, len(run.scores) + 1):
                rows.append({"method": name, "n_edits": k, **aggregate(run.scores[:k])})
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["method", "n_edits", *METRICS])
        writer.writeheader()
        writer.writerows(rows)
    return rows


def save_plot(fig, ax, out: Path, metric: str) -> Path:
    """Finish a curve plot the way every Engram report draws it (light grid, small legend, tight layout),
    save it as `out/plot-{metric}.png` at 110 dpi and close the figure; the PNG's path."""
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / f"plot-{metric}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(out: Path, rows: list[dict]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for metric in METRICS:
        series = {}
        for row in rows:
            if row.get(metric) is not None:
                series.setdefault(row["method"], []).append((row["n_edits"], row[metric]))
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.4))
        for method, points in series.items():
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", markersize=3, label=method)
        ax.set_xlabel("number of edits")
        ax.set_ylabel(metric)
        paths.append(save_plot(fig, ax, out, metric))
    return paths


def _cell(value, ci: list | None = None) -> str:
    if value is None:
        return "–"
    if not isinstance(value, float):
        return html.escape(str(value))
    return f"{value:.3f}" + (f"<br><small>[{ci[0]:.2f}, {ci[1]:.2f}]</small>" if ci else "")


def write_html(path: Path, results: dict, plots: list[Path]) -> None:
    cols = [*RESULT_KEYS, "multihop"]
    head = "".join(f"<th>{c}</th>" for c in ["method", *cols])
    body = []
    for name, summary in results["methods"].items():
        if not summary.get("available", True):
            body.append(f"<tr><td>{name}</td><td colspan={len(cols)}>unavailable: {html.escape(summary['reason'])}</td></tr>")
            continue
        ci = summary.get("ci") or {}
        body.append("<tr>" + f"<td>{name}</td>" + "".join(f"<td>{_cell(summary.get(c), ci.get(c))}</td>" for c in cols)
                    + "</tr>")
    images = "".join(
        f'<figure><img src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}"><figcaption>{p.stem}</figcaption></figure>'
        for p in plots)
    settings = html.escape(json.dumps({k: results[k] for k in ("dataset", "n_edits", "model", "protocol", "settings",
                                                                 "machine", "wall_seconds")}, indent=2))
    path.write_text(f"""<!doctype html><html><head><meta charset="utf-8"><title>Engram evaluation</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
figure{{display:inline-block;margin:8px}}</style></head><body>
<h1>Engram evaluation: {html.escape(Path(results['dataset']).name)}</h1>
<p>{results['n_edits']} edits, protocol <b>{results['protocol']}</b>, model <b>{html.escape(results['model'])}</b>.
Rates are fractions in [0, 1]; teacher-forced and generation metrics are separate columns and never mixed.
Brackets: 95% percentile-bootstrap interval over cases.</p>
<table><tr>{head}</tr>{''.join(body)}</table>
<h2>Curves</h2>{images}
<h2>Settings and machine</h2><pre>{settings}</pre></body></html>""", encoding="utf-8")


def record_in_store(store, config, results: dict, runs: dict) -> int:
    """One eval_runs row per output dir (a resumed run updates its row) and its eval_points."""
    from sqlalchemy import delete, select

    from memory.models import EvalPoint, EvalRun, utcnow

    with store.transaction() as s:
        row = s.scalars(select(EvalRun).where(EvalRun.out_dir == str(Path(config.out).resolve()))).first()
        if row is None:
            row = EvalRun(dataset=config.dataset, protocol=config.protocol, model=results["model"],
                          methods=list(config.methods), out_dir=str(Path(config.out).resolve()))
            s.add(row)
            s.flush()
        row.settings, row.status, row.finished_at = results["settings"], "finished", utcnow()
        s.execute(delete(EvalPoint).where(EvalPoint.run_id == row.id))
        points = []
        for name, run in runs.items():
            for point in run.curve:
                points += [EvalPoint(run_id=row.id, method=name, n_edits=point["n_edits"], metric=m, value=point.get(m))
                           for m in METRICS]
            summary = results["methods"][name]
            points += [EvalPoint(run_id=row.id, method=name, n_edits=config.n, metric=m, value=summary.get(m))
                       for m in RESULT_KEYS if isinstance(summary.get(m), (int, float))]
        s.add_all(points)
        return row.id


def write_all(out: Path, config, loaded, runs: dict, seconds: float, store=None) -> dict:
    results = build_results(config, loaded, runs, seconds)
    write_json(out / "results.json", results)
    rows = write_curve(out / "curve.csv", runs)
    plots = write_plots(out, rows)
    write_html(out / "report.html", results, plots)
    if store is not None:
        results["eval_run_id"] = record_in_store(store, config, results, runs)
    return results
