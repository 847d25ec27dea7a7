"""The greedy answers the gist pool gets wrong: the first N facts of a set in one pool, as `engram eval` learns them
(gates and the answer copy on), each fact's own question answered greedily, and every miss printed with its
target. This is how the answer copy's blind spots were found ("Nymphaeae" for "Noctuidae": a shorter first token).

    python scripts/probes/gist_greedy_misses.py [--dataset ../shared/data/knowedit/ZsRE-test-all.json] [--n 100]
        [--gist-addon DIR] [--no-answer-copy]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from editors.answer import generate_greedy  # noqa: E402
from editors.model import load_model  # noqa: E402
from evaluation.datasets import load_dataset  # noqa: E402
from evaluation.methods import GistMethod, NoCopyGistMethod  # noqa: E402
from evaluation.metrics import exact_match_at_start  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="../shared/data/knowedit/ZsRE-test-all.json")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--gist-addon", default=None, help="add-on directory (default: the shipped one)")
    ap.add_argument("--no-answer-copy", action="store_true", help="the gists alone")
    args = ap.parse_args()
    loaded = load_model()
    method_class = NoCopyGistMethod if args.no_answer_copy else GistMethod
    method = method_class(loaded.model, loaded.tokenizer, model_name=loaded.name, gist_addon=args.gist_addon)
    if method.unavailable():
        sys.exit(method.unavailable())
    cases = load_dataset(args.dataset, limit=args.n)
    for case in cases:
        method.learn(case)
    edits = [e for case in cases for e in case.edits]
    with method.active():
        outputs = generate_greedy(loaded.model, loaded.tokenizer, method.prompts([e.prompt for e in edits]),
                                  max_new_tokens=16)
    right = 0
    for edit, output in zip(edits, outputs):
        if exact_match_at_start(output, [edit.target]):
            right += 1
        else:
            print(f"{edit.prompt!r}  target {edit.target!r}  got {output!r}")
    print(f"greedy exact match at the start: {right} of {len(edits)} ({right / max(1, len(edits)):.3f})")


if __name__ == "__main__":
    main()
