"""Which layers must read a fact in context for its answer's later tokens to be right? The fact in the
prompt (as `gist_token_positions.py` puts it), with the prompt's and answer's positions barred from the
fact's tokens in some layers (position 0, the attention sink, stays visible): teacher-forced accuracy on
the answer's first token and on its later tokens, per set of layers that may read the fact.

The gist pool reads in the upper half of the layers only (the InComeS choice); if the fact read only
there loses the later tokens, no gist read there can give them back.

    python scripts/probes/fact_layers_probe.py [--dataset ../shared/data/knowedit/ZsRE-test-all.json] [--n 100]
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from gist_token_positions import probe_arguments, summary  # noqa: E402

from editors.incomes.introspect import attention_of, find_layer_stack  # noqa: E402
from editors.model import load_model  # noqa: E402
from evaluation.datasets import load_dataset  # noqa: E402
from evaluation.methods import statement  # noqa: E402
from evaluation.metrics import encode_target  # noqa: E402


def barred_mask(length: int, fact_end: int, device) -> torch.Tensor:
    """[1, 1, T, T] bool (True: may attend): causal, and positions from `fact_end` on do not see the
    fact's tokens 1 .. fact_end - 1."""
    allowed = torch.ones(length, length, dtype=torch.bool, device=device).tril()  # [T, T]
    allowed[fact_end:, 1:fact_end] = False
    return allowed[None, None]


@torch.no_grad()
def predictions(model, layers, barred: set[int], ids: list[int], fact_end: int, start: int) -> list[int]:
    """Argmax at each answer position of `ids` (answer from `start`), the fact barred in `barred` layers."""
    input_ids = torch.tensor([ids], device=next(model.parameters()).device)  # [1, T]
    mask = barred_mask(len(ids), fact_end, input_ids.device)

    def bar(module, args, kwargs):
        return args, {**kwargs, "attention_mask": mask}

    handles = [attention_of(layers[i]).register_forward_pre_hook(bar, with_kwargs=True) for i in barred]
    try:
        logits = model(input_ids=input_ids).logits[0]  # [T, V]
    finally:
        for h in handles:
            h.remove()
    return logits[start - 1:len(ids) - 1].argmax(-1).tolist()


def main() -> None:
    args = probe_arguments(__doc__.splitlines()[0], 100)
    loaded = load_model()
    model, tok = loaded.model, loaded.tokenizer
    _, layers = find_layer_stack(model)
    n = len(layers)
    edits = [case.edits[0] for case in load_dataset(args.dataset, limit=args.n)]
    settings = {"fact read by all": set(), f"upper {n // 2}-{n - 1}": set(range(n // 2)),
                f"lower 0-{n // 2 - 1}": set(range(n // 2, n)), "by none": set(range(n))}
    for name, barred in settings.items():
        targets, preds = [], []
        for e in edits:
            head = statement(e.prompt, e.target) + "\n"
            ids, start = encode_target(tok, head + e.prompt, e.target)
            fact_end = len(tok(head)["input_ids"]) - 1  # the fact's tokens, before the new line
            targets.append(ids[start:])
            preds.append(predictions(model, layers, barred, ids, fact_end, start))
        summary(name, targets, preds)


if __name__ == "__main__":
    main()
