"""Where the gist falls short of the fact in context: teacher-forced accuracy on the answer's first token and on
its later tokens, for the base model, the model with the one fact in its prompt, and the gist pool holding
that fact alone (both gates on, no answer copy: the facts are added without their answers, so this measures
what the gists themselves give).

    python scripts/probes/gist_token_positions.py [--dataset ../shared/data/knowedit/ZsRE-test-all.json] [--n 100]
        [--gist-addon DIR]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from editors.incomes.memory import GistMemory  # noqa: E402
from editors.model import load_model  # noqa: E402
from evaluation.datasets import load_dataset  # noqa: E402
from evaluation.methods import statement  # noqa: E402
from evaluation.metrics import argmax_tokens, encode_target, token_accuracy  # noqa: E402


def summary(name: str, targets: list[list[int]], predictions: list[list[int]]) -> None:
    per_case = [token_accuracy(pred, tgt) for tgt, pred in zip(targets, predictions)]
    first = [tgt[0] == pred[0] for tgt, pred in zip(targets, predictions)]
    later = [t == p for tgt, pred in zip(targets, predictions) for t, p in zip(tgt[1:], pred[1:])]
    print(f"{name:18s} edit success {sum(per_case) / len(per_case):.3f} | first token {sum(first) / len(first):.3f}"
          f" | later tokens {sum(later) / max(1, len(later)):.3f} ({len(later)})")


def later_misses(targets: list[list[int]], predictions: list[list[int]], base: list[list[int]],
                 in_context: list[list[int]]) -> None:
    """What the gist predicts where it misses a later answer token: an answer token already given (a repeat),
    the base model's own guess there (the gist changed nothing), or something else."""
    repeat = as_base = other = right_in_context = 0
    for tgt, pred, plain, ctx in zip(targets, predictions, base, in_context):
        for j in range(1, len(tgt)):
            if pred[j] == tgt[j]:
                continue
            right_in_context += ctx[j] == tgt[j]
            if pred[j] in tgt[:j]:
                repeat += 1
            elif pred[j] == plain[j]:
                as_base += 1
            else:
                other += 1
    n = max(1, repeat + as_base + other)
    print(f"later-token misses: {n} | repeat an earlier answer token {repeat / n:.2f} | the base model's guess "
          f"{as_base / n:.2f} | other {other / n:.2f} | right with the fact in the prompt {right_in_context / n:.2f}")


def probe_arguments(description: str, n: int) -> argparse.Namespace:
    """--dataset, --n and --gist-addon: what the gist probes in scripts/ take."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--dataset", default="../shared/data/knowedit/ZsRE-test-all.json")
    ap.add_argument("--n", type=int, default=n)
    ap.add_argument("--gist-addon", default=None, help="add-on directory (default: the shipped one)")
    return ap.parse_args()


def each_fact_alone(memory: GistMemory, edits):
    """Yields (i, edit) with that edit's fact alone in the pool (added before, removed after), as
    `engram eval` writes a learned fact (its subject and prompt feed the gates), less its answer: no copy."""
    for i, edit in enumerate(edits):
        memory.add([i], [statement(edit.prompt, edit.target)], subjects=[edit.subject], prompts=[edit.prompt])
        try:
            yield i, edit
        finally:
            memory.remove(i)


def main() -> None:
    args = probe_arguments(__doc__.splitlines()[0], 100)
    loaded = load_model()
    model, tok = loaded.model, loaded.tokenizer
    edits = [case.edits[0] for case in load_dataset(args.dataset, limit=args.n)]
    targets = [encode_target(tok, e.prompt, e.target) for e in edits]
    targets = [ids[start:] for ids, start in targets]
    answers = [e.target for e in edits]
    base = argmax_tokens(model, tok, [e.prompt for e in edits], answers)
    summary("base", targets, base)
    in_context = [statement(e.prompt, e.target) + "\n" + e.prompt for e in edits]
    with_fact = argmax_tokens(model, tok, in_context, answers)
    summary("fact in the prompt", targets, with_fact)
    memory = GistMemory.open(model, tok, loaded.name, args.gist_addon)
    predictions = []
    for _, e in each_fact_alone(memory, edits):
        with memory.reading():
            predictions += argmax_tokens(model, tok, [e.prompt], [e.target])
    memory.close()
    summary("gist, fact alone", targets, predictions)
    later_misses(targets, predictions, base, with_fact)
    lengths = [len(t) for t in targets]
    print(f"answer tokens: mean {sum(lengths) / len(lengths):.2f}, one token in {lengths.count(1)} of {len(lengths)}")


if __name__ == "__main__":
    main()
