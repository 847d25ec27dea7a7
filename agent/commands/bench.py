"""`engram bench`: speed and memory figures measured side by side in one run (DESIGN §3)."""
from __future__ import annotations

import io
import json
import platform
import tempfile
import time
from pathlib import Path

from agent.commands.common import emit, load, note
from evaluation.bench_figures import missing_figures


def _configure_bench(p) -> None:
    from evaluation.bench import SECTIONS

    p.add_argument("--out", default=None, help="write the figures to this JSON file")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--edits", type=int, default=3, help="edits per weight editor for the seconds-per-edit median")
    p.add_argument("--rag-n", type=int, default=100_000)
    p.add_argument("--ingest-n", type=int, default=20_000)
    p.add_argument("--gist-n", type=int, default=1000, help="gists in the pool for the decoding benchmark")
    p.add_argument("--scale-n", type=int, default=100_000,
                   help="facts in the pool for the scale section (ms per token against the base model)")
    p.add_argument("--chat-facts", type=int, default=100,
                   help="facts in the store (and gist pool) the chat section answers over")
    p.add_argument("--chat-repeats", type=int, default=None,
                   help="measured answers per route in the chat section (default 3, 1 with --quick)")
    p.add_argument("--chat-max-tokens", type=int, default=32, help="tokens each chat answer decodes (EOS held back)")
    p.add_argument("--startup-edits", type=int, default=1000,
                   help="recorded weight edits the startup section rebuilds the model from")
    p.add_argument("--quick", action="store_true",
                   help="small sizes and one repeat, for a schema check in a few minutes (not for the figures)")
    p.add_argument("--scaling", action="store_true",
                   help="instead of the sections: curves over 10 to 100k facts (gist, ICL, RAG) and over weight "
                        "edits (ICE, startup), written as JSON, CSV and a plot into --scaling-dir")
    p.add_argument("--scaling-dir", default="bench-scaling", help="where --scaling writes scaling.{json,csv,png}")


def bench_ingest(n: int) -> dict:
    """Facts per second through the real ingestion path into a fresh SQLite store."""
    from agent.ingest import ingest_stream
    from evaluation.bench import synthetic_facts
    from memory.store import FactStore

    text = "".join(json.dumps(f) + "\n" for f in synthetic_facts(n))
    with tempfile.TemporaryDirectory() as tmp:
        store = FactStore(f"sqlite:///{tmp}/bench.sqlite")
        report = ingest_stream(store, io.StringIO(text))
    return {"facts": n, "seconds": round(report.seconds, 2), "facts_per_second": round(report.facts_per_second, 1)}


def bench_chat(args, loaded) -> dict:
    """Per route of `engram serve`: time to first token, decode speed, latency (agent/chat/bench.py)."""
    from agent.chat.bench import ChatBenchConfig
    from agent.chat.bench import bench_chat as run

    repeats = args.chat_repeats if args.chat_repeats is not None else (1 if args.quick else 3)
    return run(loaded, ChatBenchConfig(facts=args.chat_facts, repeats=repeats, max_tokens=args.chat_max_tokens))


def cmd_scaling(args) -> int:
    from evaluation.bench_scaling import ScalingConfig, run_scaling
    from evaluation.report import machine

    cfg = ScalingConfig(sizes=(10, 100, 1000), repeats=1, ice_edits=2, startup_sizes=(10, 60)) if args.quick else ScalingConfig()
    out_dir = Path(args.scaling_dir)
    results = {"model": args.model, "machine": machine(), "quick": args.quick,
               **run_scaling(load(args), cfg, out_dir, note=note)}
    (out_dir / "scaling.json").write_text(json.dumps(results, indent=2))
    emit(args, results, json.dumps(results["usable"], indent=2) + f"\n(CSV and plot in {out_dir}/)")
    return 0


def cmd_bench(args) -> int:
    from evaluation import bench
    from evaluation.report import machine

    if args.scaling:
        return cmd_scaling(args)

    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    if args.quick:  # sizes for a schema check: the figures' names stay, their values mean little
        args.ingest_n, args.edits, args.rag_n = min(args.ingest_n, 2000), 1, min(args.rag_n, 10_000)
        args.gist_n, args.scale_n, args.startup_edits = min(args.gist_n, 200), min(args.scale_n, 2000), min(
            args.startup_edits, 60)
        args.chat_facts = min(args.chat_facts, 20)
    cfg = bench.BenchConfig(sections=tuple(wanted), ingest_n=args.ingest_n, edits_n=args.edits, rag_n=args.rag_n,
                            gist_decode_n=args.gist_n, scale_n=args.scale_n, startup_edits=args.startup_edits,
                            gist_compress_n=min(100, args.gist_n))
    loaded = load(args) if {"edits", "gist", "scale", "startup", "chat"} & set(wanted) else None
    results: dict = {"model": args.model, "machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    runners = {
        "ingest": lambda: bench_ingest(cfg.ingest_n),
        "edits": lambda: bench.bench_edits(cfg, loaded),
        "gist": lambda: bench.bench_gist(cfg, loaded),
        "scale": lambda: bench.bench_scale(cfg, loaded),
        "startup": lambda: bench.bench_startup(cfg, loaded),
        "rag": lambda: bench.bench_rag(cfg),
        "chat": lambda: bench_chat(args, loaded),
    }
    for section in wanted:
        if section == "memory":
            continue
        if section not in runners:
            note(f"unknown section {section!r}; skipped")
            continue
        note(f"bench: {section} ...")
        started = time.perf_counter()
        results[section] = runners[section]()
        results[section]["bench_seconds"] = round(time.perf_counter() - started, 1)
    results["memory"] = bench.peak_memory()
    from evaluation.bench_figures import headline

    results["figures"] = headline(results)
    missing = missing_figures(results["figures"], wanted)
    if missing:
        results["missing_figures"] = missing
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    emit(args, results, json.dumps({k: v for k, v in results.items() if k != "machine"}, indent=2)
         + f"\n(on {platform.node()}: {results['machine']['processor']}, {results['machine']['cpus']} CPUs)")
    if missing:
        note(f"bench: the sections ran but these figures are missing: {', '.join(missing)}")
        return 1
    return 0


COMMANDS = {"bench": (cmd_bench, _configure_bench, "measure speed and memory figures side by side in one run")}
