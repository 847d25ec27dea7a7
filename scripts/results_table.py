"""Print an `engram eval` run's results.json as Markdown tables in the ICE paper's form (Tables 2/3/6).

    python scripts/results_table.py runs/zsre100 [runs/wikicf100 ...]

Sequential runs give the gap-0 table (each fact measured right after its own edit, the paper's Table 6)
and the retention table (every fact again after the last edit). Retention runs give the latter only.
Rates are fractions in [0, 1]; fluency is (2/3)·H2 + (4/3)·H3 in bits (the ICE tables show half of it ×100).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

GAP0 = [("edit_success", "Edit succ. (TF)"), ("rephrase", "Rephrase"), ("portability", "Portability"),
        ("locality", "Locality"), ("fluency", "Fluency"), ("pplr", "PPL_r"), ("edit_success_gen", "Edit succ. (gen)"),
        ("multihop", "Multi-hop"), ("seconds_per_edit", "s / edit")]
AFTER = [("edit_success", "Edit succ. (TF)"), ("rephrase", "Rephrase"), ("portability", "Portability"),
         ("locality", "Locality"), ("edit_success_gen", "Edit succ. (gen)"), ("multihop", "Multi-hop")]


def cell(value, key: str) -> str:
    if value is None or (key == "seconds_per_edit" and value == 0):
        return "–"
    if key in ("fluency", "seconds_per_edit"):
        return f"{value:.2f}"
    if key == "pplr":
        return f"{value:.3f}"
    return f"{value:.3f}"


def table(rows: list[tuple[str, dict]], columns: list[tuple[str, str]]) -> str:
    used = [(k, title) for k, title in columns if any(r.get(k) is not None for _, r in rows)]
    lines = ["| method | " + " | ".join(t for _, t in used) + " |", "|---" * (len(used) + 1) + "|"]
    for name, r in rows:
        lines.append(f"| {name} | " + " | ".join(cell(r.get(k), k) for k, _ in used) + " |")
    return "\n".join(lines)


def render(run_dir: Path) -> str:
    results = json.loads((run_dir / "results.json").read_text())
    methods = {k: v for k, v in results["methods"].items() if v.get("available", True)}
    gone = {k: v.get("reason") for k, v in results["methods"].items() if not v.get("available", True)}
    out = [f"**{Path(results['dataset']).name}**, n = {results['n_edits']}, protocol {results['protocol']}, "
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
    for name, reason in gone.items():
        out.append(f"- {name}: unavailable ({reason})")
    return "\n".join(out)


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    print("\n\n".join(render(Path(a)) for a in argv))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
