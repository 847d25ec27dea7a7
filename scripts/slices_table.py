"""One method on the slices of a test file its choices were made on, beside a slice no choice touched.

    python scripts/slices_table.py --method gist \
        "ZsRE-test-all=runs/zsre100:runs/zsre100-untouched" "counterfact-val=runs/cfval100:runs/cfval100-untouched"

Each pair is LABEL=CHOSEN_DIR:UNTOUCHED_DIR, two `engram eval` runs of the same method and protocol. The
table gives each rate on both slices with its 95% bootstrap interval, their difference with the interval of
a difference of two independent samples, and "within noise" when that interval holds 0.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation import intervals  # noqa: E402
from scripts.results_table import case_scores  # noqa: E402

RATES = [("edit_success", "Edit succ. (TF)"), ("rephrase", "Rephrase"), ("portability", "Portability"),
         ("locality", "Locality"), ("edit_success_gen", "Edit succ. (gen)")]


def slice_scores(run_dir: Path, method: str) -> tuple[str, list[dict]]:
    """(which cases, the per-case scores the run's table reports: gap-0 for sequential runs, else after all)."""
    results = json.loads((run_dir / "results.json").read_text())
    manifest = run_dir / "run.json"
    offset = json.loads(manifest.read_text()).get("offset", 0) if manifest.exists() else 0
    summary = results["methods"].get(method)
    if summary is None or not summary.get("available", True):
        raise SystemExit(f"{run_dir} has no measured {method!r}")
    gap0, after = case_scores(run_dir, method, summary)
    scores = after if results["protocol"] == "retention" or not gap0 else gap0
    return f"{offset}-{offset + len(scores) - 1}", scores


def cell(values: list, ci) -> str:
    present = [v for v in values if v is not None]
    mean = sum(present) / len(present)
    return f"{mean:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{mean:.3f}"


def rows(label: str, chosen: Path, untouched: Path, method: str) -> list[str]:
    (a_span, a), (b_span, b) = slice_scores(chosen, method), slice_scores(untouched, method)
    out = []
    for key, title in RATES:
        av, bv = [s.get(key) for s in a], [s.get(key) for s in b]
        if all(v is None for v in av) or all(v is None for v in bv):
            continue
        diff = intervals.difference_interval(bv, av)
        delta = (sum(v for v in bv if v is not None) / sum(v is not None for v in bv)
                 - sum(v for v in av if v is not None) / sum(v is not None for v in av))
        verdict = "within noise" if intervals.within_noise(diff) else ("higher" if delta > 0 else "lower")
        span = f"[{diff[0]:+.2f}, {diff[1]:+.2f}]" if diff else "–"
        out.append(f"| {label} | {title} | {cell(av, intervals.bootstrap_interval(av))} (cases {a_span}) | "
                   f"{cell(bv, intervals.bootstrap_interval(bv))} (cases {b_span}) | {delta:+.3f} {span} | {verdict} |")
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("pairs", nargs="+", help="LABEL=CHOSEN_DIR:UNTOUCHED_DIR")
    parser.add_argument("--method", default="gist")
    args = parser.parse_args(argv)
    lines = ["| set | rate | slice the choices were made on | untouched slice | untouched − chosen | verdict |",
             "|---|---|---|---|---|---|"]
    for pair in args.pairs:
        label, _, dirs = pair.partition("=")
        chosen, _, untouched = dirs.partition(":")
        if not (label and chosen and untouched):
            parser.error(f"expected LABEL=CHOSEN_DIR:UNTOUCHED_DIR, got {pair!r}")
        lines += rows(label, Path(chosen), Path(untouched), args.method)
    print("\n".join(lines))
    print(f"\nMethod `{args.method}`; brackets: 95% percentile bootstrap over cases; the difference's interval "
          "resamples the two slices independently.")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
