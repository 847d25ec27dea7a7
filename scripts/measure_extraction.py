"""Measure fact extraction (agent/extract) on the 50 authored sentences with their expected fields.

Prints field-level accuracy over the sentences that state a fact (subject, target, prompt; relation for
information: its wording is free), "all three" (subject, target and prompt right together), the count of
correct "nothing" answers, and the wall time.

    python scripts/measure_extraction.py                          # rules only
    python scripts/measure_extraction.py --generator local        # SmolLM2-135M (CPU), rules first
    python scripts/measure_extraction.py --generator local --order llm-first
    python scripts/measure_extraction.py --generator openai       # ENGRAM_CONTEXT_BASE_URL etc.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.extract import ExtractConfig, extract_fact, make_extractor  # noqa: E402
from agent.extract.measure import load_cases, score  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "extraction_sentences.jsonl"
ORDERS = {"auto": None, "rules-first": True, "llm-first": False}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generator", choices=("rules", "local", "openai"), default="rules")
    parser.add_argument("--order", choices=tuple(ORDERS), default="auto",
                        help="auto: rules first for the local model, the LLM first for openai")
    parser.add_argument("--model", default="smollm2-135m", help="the local model (--generator local)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 is far faster on a machine that other jobs keep busy)")
    parser.add_argument("--cases", default=str(FIXTURE))
    parser.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    parser.add_argument("-v", "--verbose", action="store_true", help="list every miss")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    loaded = None
    if args.generator == "local":
        import torch

        from editors.model import load_model

        if args.threads:
            torch.set_num_threads(args.threads)
        loaded = load_model(args.model, args.device)
    llm = make_extractor(args.generator, loaded)
    config = ExtractConfig(rules_first=ORDERS[args.order])
    cases = load_cases(args.cases)
    result = score(cases, lambda text: extract_fact(text, llm, config))
    wall = time.perf_counter() - started
    name = getattr(llm, "name", "rules")
    summary = {"generator": name, "order": args.order, **result.as_dict(), "wall_s": round(wall, 1)}
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"extraction on {args.cases}: {result.cases} sentences, {result.facts} with a fact, "
          f"{result.nothing_expected} without; generator {name}, order {args.order}")
    print(f"{'field':<10} {'accuracy':>8}")
    for key in ("subject", "target", "prompt", "all", "relation"):
        label = "all three" if key == "all" else key
        print(f"{label:<10} {result.rate(key):>8.3f}   ({result.correct[key]}/{result.facts})")
    print(f"nothing: {result.nothing_correct}/{result.nothing_expected} correct; "
          f"missed facts {result.missed}, invented facts {result.invented}")
    by = ", ".join(f"{m} {n}" + ("" if m == "none" else f" ({result.right_by_method.get(m, 0)} fully right)")
                   for m, n in sorted(result.methods.items()))
    print(f"answered by: {by}")
    print(f"time: {result.seconds:.2f} s extracting ({1000 * result.seconds / max(1, result.cases):.1f} ms a "
          f"sentence), {wall:.1f} s wall with loading")
    if args.verbose:
        for case, got, wrong in result.misses:
            print(f"- [{case.kind}] {case.text}\n    wrong {', '.join(wrong)}: subject={got.subject!r} "
                  f"prompt={got.prompt!r} target={got.target!r} ({got.method or 'none'}: {got.reason})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
