"""The three-policy measurement of issue 22: one stream of facts through `engram run` under each routing
policy (all gist, all ICE, and the mixed policy that was the default before it), then the same questions
asked of each end state.

The stream is validation data only (no evaluation file): the 266 records of the validation split
(`runs/splits`, built by `python -m evaluation.splits`), one in ten given without its subject (a source
that has none), the 50 sentences of the extraction fixture as plain text, and the 20 demo facts as one
user's facts. Each policy gets a fresh store; the agent runs it to idle with periodic self-evaluation.
Then a separate process scores the end state on the split's own questions: edit success (teacher-forced
and greedy) after the whole stream (= retention), rephrase, and locality on each record's neighbourhood
prompts against the base model; the last self-evaluation point adds locality on the project's probes
and fluency; the store gives the gap-0 check (the greedy check right after each edit) and the route mix.

    python scripts/measure_policies.py --out runs/policies [--policies gist,ice,mixed] [--consolidate]
    python scripts/measure_policies.py --out runs/policies --table     # the Markdown table of what is there
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SPLITS = ("counterfact", "wiki_counterfact", "wiki_recent")
SENTENCES = ROOT / "tests" / "fixtures" / "extraction_sentences.jsonl"
SCOPED_USER = "alice"
POLICIES = {  # RoutePolicy changes from the shipped default (which this measurement chose: all gist)
    "gist": {"default_route": "gist", "subjectless_route": "gist", "supersede_route": "gist",
             "retry_other_route": False},
    "ice": {"default_route": "ice", "subjectless_route": "ice", "supersede_route": "ice",
            "weight_scopes": ["global", "user", "session"], "max_ice_backlog": 1_000_000,
            "retry_other_route": False},
    "mixed": {"subjectless_route": "ice", "retry_other_route": True},  # the default before it
}
METRICS = ("edit_success", "edit_success_gen", "rephrase", "locality")


def engram() -> str:
    return str(Path(sys.executable).with_name("engram"))


# -- the stream ------------------------------------------------------------------------------------
def build_stream(splits: Path, seed: int = 0) -> tuple[list[dict], dict[str, str]]:
    """The stream's lines (seeded order) and, for each split record, its content key -> case id."""
    os.environ.setdefault("ENGRAM_SPLITS", str(splits))
    from agent.demo_facts import DEMO_FACTS
    from evaluation.datasets import load_dataset

    lines, keys = [], {}
    for name in SPLITS:
        for i, case in enumerate(load_dataset(f"validation:{name}")):
            line = {"prompt": case.prompt, "target": case.target, "subject": case.subject}
            if len(keys) % 10 == 9:  # a source that gives no subject
                line.pop("subject")
            keys[f"{case.prompt}\t{case.target}"] = f"{name}:{case.case_id}"
            lines.append(line)
    for record in map(json.loads, SENTENCES.read_text().splitlines()):
        lines.append({"text": record["text"]})
    lines += [{**fact, "scope": "user", "user_id": SCOPED_USER} for fact in DEMO_FACTS]
    random.Random(seed).shuffle(lines)
    return lines, keys


# -- one policy through the agent ------------------------------------------------------------------
def run_policy(name: str, out: Path, stream: Path, eval_every: int) -> dict:
    from agent.router import RoutePolicy, save_policy
    from memory.store import FactStore

    where = out / name
    where.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{where / 'store.sqlite'}"
    save_policy(FactStore(url, create=True), RoutePolicy().with_changes(**POLICIES[name]))
    cmd = [engram(), "run", "--db", url, "--source", str(stream), "--until-idle", "--json",
           "--eval-every", str(eval_every), "--eval-sample", "1000"]
    started = time.perf_counter()
    with open(where / "run.log", "w") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
    record = {"policy": name, "command": " ".join(cmd), "rc": rc, "run_seconds": time.perf_counter() - started}
    (where / "agent.json").write_text(json.dumps(record, indent=2))
    return record


def consolidate_copy(where: Path) -> Path:
    """A copy of a scored end state, consolidated by `engram consolidate` (its --json in consolidate.json)."""
    copy = where.with_name(where.name + "-consolidated")
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(where, copy, ignore=shutil.ignore_patterns("scores.json", "cases.jsonl", "run.log"))
    url = f"sqlite:///{copy / 'store.sqlite'}"
    with open(copy / "consolidate.json", "w") as out, open(copy / "consolidate.log", "w") as log:
        subprocess.check_call([engram(), "consolidate", "--db", url, "--json"], stdout=out, stderr=log)
    return copy


# -- scoring an end state (its own process: the model is edited in place) ----------------------------
def score_state(where: Path, splits: Path) -> dict:
    os.environ.setdefault("ENGRAM_SPLITS", str(splits))
    from argparse import Namespace

    from agent.commands.common import load_state, open_gist
    from editors.model import load_model
    from evaluation.datasets import load_dataset
    from evaluation.measure import BaseCache, Scorer, aggregate
    from evaluation.methods import Method

    cases = [c for name in SPLITS for c in load_dataset(f"validation:{name}")]
    base = BaseCache.open(where / "base-locality.json", load_model("smollm2-135m", "cpu"), cases, batch_size=32)
    args = Namespace(db=f"sqlite:///{where / 'store.sqlite'}", model="smollm2-135m", device="cpu", gist_addon=None)
    store, loaded, state = load_state(args, store=None)
    gist = open_gist(args, store, loaded)

    class EndState(Method):  # the live edited weights, reading the pool as a global user
        name = "agent"

        def active(self):
            return gist.memory.reading() if gist is not None else super().active()

    config = Namespace(batch_size=32, gen_tokens=12, fluency_tokens=0)
    scorer = Scorer(state.model, loaded.tokenizer, base, config)
    scores = [scorer.score(EndState(state.model, loaded.tokenizer), case) for case in cases]
    (where / "cases.jsonl").write_text("".join(json.dumps(s.to_json()) + "\n" for s in scores))
    summary = {k: v for k, v in aggregate(scores).items() if k in METRICS}
    summary["n_cases"] = len(scores)
    summary.update(store_figures(store))
    state.close()
    return summary


def store_figures(store) -> dict:
    """Route mix, the gap-0 check, retries and the last self-evaluation point, from the store."""
    from sqlalchemy import func, select

    from agent.selfeval.evaluator import RUN_KEY, latest_point
    from memory.models import Edit, Event, Stage

    with store.transaction() as s:
        stages = dict(s.execute(select(Stage.stage, func.count()).group_by(Stage.stage)).all())
        routes = dict(s.execute(select(Stage.route, func.count()).where(Stage.stage == "applied")
                                .group_by(Stage.route)).all())
        checks = s.execute(select(Event.fact_id, Event.detail).where(Event.kind == "verified")
                           .order_by(Event.id)).all()
        retried = s.scalar(select(func.count()).select_from(Event).where(
            Event.kind == "routed", Event.detail["inputs"]["retry_of"].as_string().in_(("ice", "gist"))))
        ice_seconds = s.scalar(select(func.sum(Edit.seconds)).where(Edit.backend != "gist"))
    from evaluation.intervals import bootstrap_interval

    first, last = {}, {}
    for fact_id, detail in checks:
        if detail.get("ok") is not None:
            first.setdefault(fact_id, detail["ok"])
            last[fact_id] = detail["ok"]
    gap0 = [float(ok) for ok in first.values()]
    raw = store.get_meta(RUN_KEY)
    point = latest_point(store, int(raw)) if raw and raw.isdigit() else None
    return {"stages": stages, "routes": routes, "retried": retried or 0, "checked": len(first),
            "gap0_gen": sum(first.values()) / len(first) if first else None,
            "gap0_gen_ci": bootstrap_interval(gap0) if gap0 else None,
            "verified_end": sum(last.values()) / len(last) if last else None,
            "weight_edit_seconds": ice_seconds or 0.0, "last_point": point}


# -- the table -------------------------------------------------------------------------------------
def intervals(where: Path) -> dict:
    """The 95% bootstrap interval of each scored rate, over the split's cases (evaluation/intervals.py)."""
    from evaluation.intervals import bootstrap_intervals

    cases = [json.loads(line) for line in (where / "cases.jsonl").read_text().splitlines()]
    return bootstrap_intervals({m: [c[m] for c in cases] for m in METRICS})


def table(out: Path) -> str:
    rows = ["| policy | route mix (applied) | gap-0 check (gen) | edit succ. TF / gen after all | rephrase | "
            "locality (neighbours) | locality (probes) | fluency | agent time |",
            "|---|---|---|---|---|---|---|---|---|"]
    for where in sorted(p for p in out.iterdir() if (p / "scores.json").exists()):
        sc, ag = json.loads((where / "scores.json").read_text()), json.loads((where / "agent.json").read_text())
        point = sc.get("last_point") or {}
        mix = ", ".join(f"{k} {v}" for k, v in sorted(sc["routes"].items()))
        minutes = f"{ag['run_seconds'] / 60:.1f} min"
        if (where / "consolidate.json").exists():  # the stream's checks and eval points predate it
            moved = json.loads((where / "consolidate.json").read_text())
            minutes += f" + {moved['seconds'] / 60:.1f} min consolidating"
            tried = moved["consolidated"] + moved["not_learned"]
            sc["gap0_gen"], sc["gap0_gen_ci"] = (moved["consolidated"] / tried if tried else None), None
            point = {}
        ci = {**intervals(where), "gap0_gen": sc.get("gap0_gen_ci")}
        f = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731

        def r(key: str) -> str:  # a rate and its interval
            low_high = ci.get(key)
            return f(sc[key]) + (f" [{low_high[0]:.2f}, {low_high[1]:.2f}]" if low_high else "")
        rows.append(f"| {where.name} | {mix} | {r('gap0_gen')} | {r('edit_success')} / "
                    f"{r('edit_success_gen')} | {r('rephrase')} | {r('locality')} | "
                    f"{f(point.get('locality'))} | {f(point.get('fluency'))} | {minutes} |")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "policies")
    ap.add_argument("--splits", type=Path, default=ROOT / "runs" / "splits")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--limit", type=int, default=None, help="only the stream's first N lines (a smoke run)")
    ap.add_argument("--consolidate", action="store_true", help="also score a copy of each end state after `engram consolidate` (NAME-consolidated)")
    ap.add_argument("--table", action="store_true", help="print the table of the policies measured in --out")
    ap.add_argument("--score-only", type=Path, help=argparse.SUPPRESS)  # the scoring subprocess
    args = ap.parse_args()
    if args.table:
        print(table(args.out))
        return 0
    if args.score_only:
        (args.score_only / "scores.json").write_text(json.dumps(score_state(args.score_only, args.splits), indent=2))
        return 0
    if not (args.splits / "validation-counterfact.json").exists():
        sys.exit(f"no validation split in {args.splits}: python -m evaluation.splits --data ../shared/data "
                 f"--out {args.splits}")
    args.out.mkdir(parents=True, exist_ok=True)
    lines, _ = build_stream(args.splits)
    lines = lines[: args.limit]
    stream = args.out / "stream.jsonl"
    stream.write_text("".join(json.dumps(x) + "\n" for x in lines))
    print(f"stream: {len(lines)} lines -> {stream}", flush=True)
    for name in args.policies.split(","):
        if name not in POLICIES:
            sys.exit(f"unknown policy {name!r}; known: {', '.join(POLICIES)}")
        record = run_policy(name, args.out, stream, args.eval_every)
        print(f"{name}: agent rc {record['rc']} in {record['run_seconds']:.0f} s", flush=True)
        score = [sys.executable, __file__, "--splits", str(args.splits), "--score-only"]
        subprocess.check_call([*score, str(args.out / name)])
        if args.consolidate:  # after the scoring, so the copy reuses its cached base answers
            subprocess.check_call([*score, str(consolidate_copy(args.out / name))])
    print(table(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
