"""How much a query reads its fact's gist at each kind of position: the softmax mass on the gist (against
the zero-gist), averaged over heads and upper layers, on the prompt's positions, on the position that predicts
the answer's first token, and on those that predict its later tokens (teacher-forced, the fact alone in the
pool, both gates on).

    python scripts/gist_read_mass.py [--dataset ../shared/data/knowedit/ZsRE-test-all.json] [--n 40]
        [--gist-addon DIR]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from editors.incomes import modules  # noqa: E402
from editors.incomes.memory import GistMemory  # noqa: E402
from editors.model import load_model  # noqa: E402
from evaluation.datasets import load_dataset  # noqa: E402
from evaluation.methods import statement  # noqa: E402
from evaluation.metrics import encode_target  # noqa: E402

MASSES: list[torch.Tensor] = []  # per upper layer: [T] gist mass of the one sequence read


def recording(forward):
    """GistAttention.forward that also records the read mass (the output is the original's)."""
    def wrapped(self, attn, h, cos_sin, y, keys, values, read, temperature, visible=None):
        q = self.queries(attn, h, cos_sin)  # [1, H, T, D]
        heads = self.n_heads // self.n_kv_heads
        k = torch.cat([self.zero_key[None].to(keys.dtype), keys], dim=0).repeat_interleave(heads, dim=1)
        att = torch.einsum("bhtd,nhd->bhtn", q, k) * (attn.scaling / temperature)  # [1, H, T, N+1]
        MASSES.append(att.softmax(dim=-1)[..., 1:].sum(-1).mean(1)[0])  # [T]
        return forward(self, attn, h, cos_sin, y, keys, values, read, temperature, visible)
    return wrapped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="../shared/data/knowedit/ZsRE-test-all.json")
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--gist-addon", default=None, help="add-on directory (default: the shipped one)")
    args = ap.parse_args()
    modules.GistAttention.forward = recording(modules.GistAttention.forward)
    loaded = load_model()
    model, tok = loaded.model, loaded.tokenizer
    memory = GistMemory.open(model, tok, loaded.name, args.gist_addon)
    mass = {"prompt": [], "first answer token": [], "later answer tokens": []}
    for i, case in enumerate(load_dataset(args.dataset, limit=args.n)):
        edit = case.edits[0]
        memory.add([i], [statement(edit.prompt, edit.target)], subjects=[edit.subject], prompts=[edit.prompt])
        ids, start = encode_target(tok, edit.prompt, edit.target)
        MASSES.clear()
        with memory.reading(), torch.no_grad():
            model(torch.tensor([ids], device=model.device))
        memory.remove(i)
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
