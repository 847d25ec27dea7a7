"""How much a query reads its fact's gist at each kind of position: the softmax mass on the gist (against
the zero-gist), averaged over heads and upper layers, on the prompt's positions, on the position that predicts
the answer's first token, and on those that predict its later tokens (teacher-forced, the fact alone in the
pool, both gates on).

    python scripts/probes/gist_read_mass.py [--dataset ../shared/data/knowedit/ZsRE-test-all.json] [--n 40]
        [--gist-addon DIR]
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from gist_token_positions import each_fact_alone, probe_arguments  # noqa: E402

from editors.incomes import modules  # noqa: E402
from editors.incomes.memory import GistMemory  # noqa: E402
from editors.model import load_model  # noqa: E402
from evaluation.datasets import load_dataset  # noqa: E402
from evaluation.metrics import encode_target  # noqa: E402

MASSES: list[torch.Tensor] = []  # per upper layer: [T] gist mass of the one sequence read


def recording(attention):
    """GistAttention.attention that also records the read mass (its output unchanged)."""
    def wrapped(self, *args, **kwargs):
        att = attention(self, *args, **kwargs)  # [1, H, T, N+1]
        MASSES.append(att[..., 1:].float().sum(-1).mean(1)[0])  # [T]
        return att
    return wrapped


def main() -> None:
    args = probe_arguments(__doc__.splitlines()[0], 40)
    modules.GistAttention.attention = recording(modules.GistAttention.attention)
    loaded = load_model()
    model, tok = loaded.model, loaded.tokenizer
    memory = GistMemory.open(model, tok, loaded.name, args.gist_addon)
    edits = [case.edits[0] for case in load_dataset(args.dataset, limit=args.n)]
    mass = {"prompt": [], "first answer token": [], "later answer tokens": []}
    for _, edit in each_fact_alone(memory, edits):
        ids, start = encode_target(tok, edit.prompt, edit.target)
        MASSES.clear()
        with memory.reading(), torch.no_grad():
            model(torch.tensor([ids], device=model.device))
        if not MASSES:  # the gates kept the fact from its own prompt
            continue
        per_position = torch.stack(MASSES).mean(0).tolist()  # [T]; position p predicts token p + 1
        mass["prompt"] += per_position[:start - 1]
        mass["first answer token"].append(per_position[start - 1])
        mass["later answer tokens"] += per_position[start:len(ids) - 1]
    memory.close()
    for name, values in mass.items():
        print(f"{name:20s} gist mass {sum(values) / max(1, len(values)):.3f} ({len(values)} positions)")


if __name__ == "__main__":
    main()
