"""Print an `engram eval` run's results.json as Markdown tables in the ICE paper's form (Tables 2/3/6).

    python scripts/results_table.py runs/zsre100 [runs/wikicf100 ...] [--compare gist,rag-subject]

Sequential runs give the gap-0 table (each fact measured right after its own edit, the paper's Table 6)
and the retention table (every fact again after the last edit). Retention runs give the latter only.
Rates are fractions in [0, 1]; fluency is (2/3)·H2 + (4/3)·H3 in bits (the ICE tables show half of it ×100).
Each value is followed by its 95% percentile-bootstrap interval over cases, `0.916 [0.86, 0.96]`. A run
written before intervals existed has them computed from its points-*.jsonl / retention-*.jsonl files.
`--compare A,B` adds A − B per metric with a paired interval (the same resampled cases for both methods);
"within noise" marks an interval that contains 0.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from evaluation import intervals

GAP0 = [("edit_success", "Edit succ. (TF)"), ("rephrase", "Rephrase"), ("portability", "Portability"),
        ("locality", "Locality"), ("fluency", "Fluency"), ("pplr", "PPL_r"), ("edit_success_gen", "Edit succ. (gen)"),
        ("multihop", "Multi-hop"), ("seconds_per_edit", "s / edit")]
AFTER = [("edit_success", "Edit succ. (TF)"), ("rephrase", "Rephrase"), ("portability", "Portability"),
         ("locality", "Locality"), ("edit_success_gen", "Edit succ. (gen)"), ("multihop", "Multi-hop")]
METRICS = ("edit_success", "rephrase", "portability", "locality", "edit_success_gen", "portability_gen",
           "multihop", "fluency", "pplr")  # evaluation.measure.METRICS, not imported: that would load torch
NO_CI = "Values without brackets have no interval (fewer than 2 cases, or no per-case values on disk)."


def cell(value, key: str, ci: list | None = None) -> str:
    if value is None or (key == "seconds_per_edit" and value == 0):
        return "–"
    text = f"{value:.2f}" if key in ("fluency", "seconds_per_edit") else f"{value:.3f}"
    return f"{text} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci and key != "seconds_per_edit" else text


def table(rows: list[tuple[str, dict]], columns: list[tuple[str, str]]) -> str:
    used = [(k, title) for k, title in columns if any(r.get(k) is not None for _, r in rows)]
    lines = ["| method | " + " | ".join(t for _, t in used) + " |", "|---" * (len(used) + 1) + "|"]
    for name, r in rows:
        ci = r.get("ci") or {}
        lines.append(f"| {name} | " + " | ".join(cell(r.get(k), k, ci.get(k)) for k, _ in used) + " |")
    return "\n".join(lines)


# -- per-case values on disk ----------------------------------------------------------------------
def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL file; a torn line is skipped (this only reads: the harness heals files)."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def case_scores(run_dir: Path, name: str, summary: dict) -> tuple[list[dict], list[dict]]:
    """(gap-0, after-all) per-case score dicts of one method, as the harness kept them; [] where absent."""
    points = run_dir / f"points-{name}.jsonl"
    records = sorted(read_jsonl(points), key=lambda r: r.get("i", 0)) if points.exists() else []
    gap0 = [r["score"] for r in records if r.get("score")]
    path = run_dir / f"retention-{name}.jsonl"
    if path.exists():
        after = read_jsonl(path)
    elif summary.get("retention") is not None and gap0:
        # a method that learns nothing is not measured again: the harness reuses its gap-0 scores
        after = [{**s, "fluency": None, "pplr": None} for s in gap0]
    else:
        after = []
    return gap0, after


def _mean(values: list) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def recomputed_ci(scores: list[dict], summary: dict) -> dict:
    """Intervals from per-case scores, kept only for metrics whose mean matches the saved value (PPL_r, for
    one, is not in points-*.jsonl: the harness scores it after the stream, so it gets none)."""
    found = intervals.case_intervals(scores, METRICS)
    out = {}
    for k, ci in found.items():
        mean, saved = _mean([s.get(k) for s in scores]), summary.get(k)
        out[k] = ci if mean is not None and saved is not None and abs(mean - saved) <= 1e-9 else None
    return out


def fill_intervals(run_dir: Path, results: dict) -> list[str]:
    """Give an old run's summaries their "ci" blocks from the per-case files; returns notes for the reader."""
    notes = []
    main_is_after = results["protocol"] == "retention"
    for name, summary in results["methods"].items():
        if not summary.get("available", True) or "ci" in summary:
            continue
        gap0, after = case_scores(run_dir, name, summary)
        main = after if main_is_after or not gap0 else gap0
        summary["ci"] = recomputed_ci(main, summary) if main else {}
        if summary.get("retention") is not None:
            summary["retention"]["ci"] = recomputed_ci(after, summary["retention"]) if after else {}
        if not main:
            notes.append(f"- {name}: no intervals (results.json has none and {run_dir}/points-{name}.jsonl is missing)")
        else:
            notes.append(f"- {name}: intervals computed from the per-case files (results.json predates them)")
    return notes


# -- paired comparison ----------------------------------------------------------------------------
def compare(run_dir: Path, results: dict, a: str, b: str) -> str:
    methods = results["methods"]
    missing = [m for m in (a, b) if m not in methods or not methods[m].get("available", True)]
    if missing:
        return f"Cannot compare {a} with {b}: {', '.join(missing)} not an available method of this run."
    (a0, a1), (b0, b1) = (case_scores(run_dir, m, methods[m]) for m in (a, b))
    if results["protocol"] == "retention":
        stages = [("after all facts are learned", a1, b1, AFTER)]
    else:
        stages = [("gap-0", a0, b0, GAP0), ("after all edits (retention)", a1, b1, AFTER)]
    out = []
    for stage, sa, sb, columns in stages:
        if not sa and not sb:
            continue
        by_id = {s["case_id"]: s for s in sb}
        pairs = [(s, by_id[s["case_id"]]) for s in sa if s["case_id"] in by_id]
        if not pairs:
            out.append(f"{a} − {b}, {stage}: no per-case values for both methods in {run_dir}.")
            continue
        lines = [f"{a} − {b}, {stage} (paired bootstrap over the same {len(pairs)} cases):", "",
                 f"| metric | {a} | {b} | difference | 95% interval | |", "|---|---|---|---|---|---|"]
        skipped: list[str] = []
        for key, title in columns:
            if key == "seconds_per_edit":
                continue
            va, vb = [x.get(key) for x, _ in pairs], [y.get(key) for _, y in pairs]
            ma, mb = _mean(va), _mean(vb)
            if ma is None or mb is None:
                if methods[a].get(key) is not None and stage == "gap-0":
                    skipped.append(title)  # a saved value whose per-case values are not on disk (PPL_r)
                continue
            ci = intervals.paired_difference_interval(va, vb)
            verdict = "within noise" if intervals.within_noise(ci) else \
                ("–" if ci is None else f"{a if ma > mb else b} higher")
            span = f"[{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "–"
            lines.append(f"| {title} | {cell(ma, key)} | {cell(mb, key)} | {ma - mb:+.3f} | {span} | {verdict} |")
        if skipped:
            lines += ["", f"Not compared: {', '.join(skipped)} (no per-case values in the points files)."]
        out.append("\n".join(lines))
    return "\n\n".join(out) if out else f"{a} − {b}: no per-case files in {run_dir}, nothing to compare."


def render(run_dir: Path, comparisons: list[tuple[str, str]] = ()) -> str:
    results = json.loads((run_dir / "results.json").read_text())
    notes = fill_intervals(run_dir, results)
    methods = {k: v for k, v in results["methods"].items() if v.get("available", True)}
    gone = {k: v.get("reason") for k, v in results["methods"].items() if not v.get("available", True)}
    manifest = run_dir / "run.json"  # the run's settings: which slice of the file it read
    offset = json.loads(manifest.read_text()).get("offset", 0) if manifest.exists() else 0
    cases = f"cases {offset}-{offset + results['n_edits'] - 1}" if offset else f"n = {results['n_edits']}"
    out = [f"**{Path(results['dataset']).name}**, {cases}, protocol {results['protocol']}, "
           f"model {results['model']}, {results['wall_seconds'] / 60:.0f} min wall on "
           f"{results['machine'].get('cpus')} CPUs ({results['machine'].get('cuda') or 'no GPU'})", ""]
    if results["protocol"] == "sequential":
        out += ["Gap-0 (each fact right after its own edit):", "", table(list(methods.items()), GAP0), ""]
        after = [(k, v["retention"]) for k, v in methods.items() if v.get("retention")]
        if after:  # absent with --no-retention
            out += ["After all edits (retention):", "", table(after, AFTER), ""]
    else:
        rows = [(k, {**v, **(v.get("retention") or {})}) for k, v in methods.items()]
        out += ["After all facts are learned:", "", table(rows, AFTER), ""]
    spec = results.get("intervals") or intervals.describe()
    out.append(f"Brackets: {spec['level']:.0%} {spec['kind']} ({spec['n_resamples']} resamples). {NO_CI}")
    out += notes
    for name, reason in gone.items():
        out.append(f"- {name}: unavailable ({reason})")
    for a, b in comparisons:
        out += ["", compare(run_dir, results, a, b)]
    return "\n".join(out)


def _pair(text: str) -> tuple[str, str]:
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 2 or not all(parts):
        raise argparse.ArgumentTypeError(f"--compare takes two method names, A,B (got {text!r})")
    return parts[0], parts[1]


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    parser = argparse.ArgumentParser(description="Markdown tables of engram eval runs, with 95% intervals.")
    parser.add_argument("runs", nargs="+", type=Path, help="run directories holding results.json")
    parser.add_argument("--compare", action="append", type=_pair, default=[], metavar="A,B",
                        help="also print A − B per metric with its paired interval (repeatable)")
    args = parser.parse_args(argv)
    print("\n\n".join(render(d, args.compare) for d in args.runs))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
