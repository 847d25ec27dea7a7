"""`engram eval`: every method on the same stream of benchmark cases; results, curve, plots and a report."""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from agent.commands.common import emit, load, note, open_store
from agent.progress import progress

if TYPE_CHECKING:
    from agent.contexts import ContextConfig, ContextGenerator

CONTEXT_CHOICES = ("none", "template", "local", "openai", "auto")  # the same as `engram ingest --contexts`


def _configure_eval(p) -> None:
    p.add_argument("--dataset", required=True, help="a benchmark file (KnowEdit, zsRE, CounterFact, MQuAKE, DUnE)")
    p.add_argument("--format", default="auto", help="the file's format (default: detect it)")
    p.add_argument("--n", type=int, default=100, help="number of cases (edits) in the stream")
    p.add_argument("--offset", type=int, default=0, help="skip the file's first K cases (e.g. a slice no choice was made on)")
    p.add_argument("--methods", default="base,ftm,ice,gist,icl,rag,rag-subject",
                   help="comma-separated: base,ftm,ice,gist,gist-nocopy,gist-cosine,gist-mention,gist-ungated,icl,rag,"
                        "rag-subject")
    p.add_argument("--protocol", default="sequential", choices=["single", "sequential", "retention"])
    p.add_argument("--every", type=int, default=None, help="re-measure all cases so far every K edits (curve points)")
    p.add_argument("--out", required=True, help="output directory (a rerun with the same DIR resumes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--fluency-n", type=int, default=10, help="measure fluency and PPL_r on the first N cases")
    p.add_argument("--no-generation", action="store_true",
                   help="no greedy answers (edit_success_gen, portability_gen, multihop); fluency and PPL_r still run on the first --fluency-n cases")
    p.add_argument("--measure-n", type=int, default=None,
                   help="retention: measure only the first M cases; all N are learned (large pools, less time)")
    p.add_argument("--no-retention", action="store_true",
                   help="sequential: gap-0 only (the ICE paper's Table 6), without re-measuring all after the last edit")
    p.add_argument("--rag-k", type=int, default=10)
    p.add_argument("--gist-addon", default=None, help="directory of a trained gist add-on (default: the shipped one)")
    p.add_argument("--contexts", default="template", choices=CONTEXT_CHOICES,
                   help="where ICE gets its paraphrase contexts during evaluation (as `engram ingest --contexts`): "
                        "none, template (default), local (the evaluated model), openai, or auto "
                        "(openai when ENGRAM_CONTEXT_BASE_URL or OPENAI_BASE_URL is set, else local)")


def context_config(kind: str, env: Mapping[str, str] | None = None) -> ContextConfig | None:
    """The ContextConfig that `--contexts KIND` names (None for `none`), checked before any model loads."""
    from agent.contexts import ContextConfig

    env = os.environ if env is None else env
    if kind == "none":
        return None
    # the flag decides the backend, so a stray ENGRAM_CONTEXT_BACKEND neither overrides nor breaks it
    config = ContextConfig.from_env({**env, "ENGRAM_CONTEXT_BACKEND": "template" if kind == "auto" else kind})
    if kind == "auto":  # resolved as `engram ingest --contexts auto` resolves it (agent.enrich)
        config.backend = "openai" if config.base_url else "local"
    return config


def _contexts_fn(generator: ContextGenerator | None) -> Callable[[str, str], Sequence[str]] | None:
    """The harness's (prompt, target) -> contexts; None (no contexts) without a generator."""
    from agent.contexts import contexts_for

    if generator is None:
        return None
    return lambda prompt, target: contexts_for(prompt, target, generator)[0]


def cmd_eval(args) -> int:
    from agent.contexts import make_generator
    from evaluation.harness import EvalConfig, Harness
    from evaluation.report import write_all

    config = EvalConfig(dataset=args.dataset, out=args.out, methods=[m.strip() for m in args.methods.split(",") if m.strip()],
                        n=args.n, offset=args.offset, format=args.format, protocol=args.protocol, every=args.every, seed=args.seed,
                        batch_size=args.batch_size, fluency_n=args.fluency_n, rag_k=args.rag_k,
                        generation=not args.no_generation, measure_n=args.measure_n,
                        retention=not args.no_retention, gist_addon=args.gist_addon)
    contexts = context_config(args.contexts)
    # template and openai need no model: built now, a missing URL, key or client fails before the model loads
    generator = make_generator(contexts) if contexts is not None and contexts.backend != "local" else None
    store = open_store(args, create=True)  # the run is recorded in the store's eval tables
    loaded = load(args)
    if contexts is not None and contexts.backend == "local":
        generator = make_generator(contexts, loaded_model=loaded)  # paraphrased by the evaluated model
    started = time.perf_counter()
    harness = Harness(config, loaded, contexts_fn=_contexts_fn(generator), progress=progress,
                      contexts_name=getattr(generator, "name", None))
    note(f"{len(harness.cases)} cases from {args.dataset}; methods {', '.join(config.methods)}; protocol {config.protocol}")
    runs = harness.run()
    results = write_all(Path(args.out), config, loaded, runs, time.perf_counter() - started, store)
    lines = [f"{'method':<6} " + " ".join(f"{k[:12]:>12}" for k in ("edit_success", "rephrase", "portability", "locality",
                                                                   "edit_succ_gen", "port_gen", "s/edit"))]
    for name, m in results["methods"].items():
        if not m.get("available", True):
            lines.append(f"{name:<6} unavailable: {m['reason']}")
            continue
        vals = [m.get(k) for k in ("edit_success", "rephrase", "portability", "locality", "edit_success_gen",
                                   "portability_gen", "seconds_per_edit")]
        lines.append(f"{name:<6} " + " ".join(f"{v:>12.3f}" if v is not None else f"{'-':>12}" for v in vals))
    lines.append(f"wrote {args.out}/results.json, curve.csv, plots and report.html in {results['wall_seconds']:.0f} s")
    emit(args, results, "\n".join(lines))
    return 0


COMMANDS = {"eval": (cmd_eval, _configure_eval, "run a continual-editing evaluation of every method on a benchmark")}
