"""Sequential-editing probe for tuning ICE / FT-M settings on TRAIN-split facts (issue 3).

Edits N facts one after another on the live model with one config, then reports:
  success_now   greedy answer starts with the target right after its own edit (gap-0)
  success_all   the same check for every fact after all N edits (retention)
  loc_exact     locality probes whose greedy 6-token output is unchanged vs the unedited model
  loc_token     fraction of those 6 tokens whose teacher-forced argmax is unchanged (finer)
  unrel_exact, unrel_token  the same on unrelated prompts: the prompts of the file's next records, which
                no edit touched (other subjects, mostly other relations; the file's own probes are
                neighbours: CounterFact's ask the edit's relation of other subjects, wiki_counterfact's
                other relations of the same subject)
  unrel_gt      on those unrelated prompts, the share of their ground-truth answer's tokens whose teacher-
                forced argmax is unchanged (KnowEdit's locality: a given answer, often not the model's own, so
                positions where the model is unsure count too)
  loc_by_pos    that token agreement at each of the 6 positions
  steps, seconds per edit
and appends one JSON line per run to --out.

  .venv/bin/python scripts/sweep_ice.py --method ice --n 10 --set norm_constraint=0.02 --set lam=2 --tag lam2
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.contexts import template_contexts  # noqa: E402
from editors.answer import generate_greedy  # noqa: E402
from editors.base import EditRequest, restore, snapshot  # noqa: E402
from editors.model import load_model  # noqa: E402
from editors.registry import make_editor  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TRAIN_FILES = ("counterfact/counterfact-edit.json", "knowedit/wiki_counterfact_train_cf.json")
PROBE_TOKENS = 6


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="ice", choices=["ice", "ftm", "ice-box", "ftm-box"])
    p.add_argument("--data", default=str(DATA / TRAIN_FILES[0]),
                   help="a train file, or a validation split of them (evaluation.splits: validation-*.json)")
    p.add_argument("--n", type=int, default=10, help="facts edited in sequence")
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--probes", type=int, default=30, help="locality probes (the facts' own, then the next records')")
    p.add_argument("--contexts", default="template", choices=["template", "none"])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (JSON value)")
    p.add_argument("--tag", default="")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", default="sweep_ice.jsonl")
    return p.parse_args(argv)


def overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, _, raw = pair.partition("=")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw  # bare strings such as box_mode=absolute
    return out


def load_records(path: str) -> list[dict]:
    """prompt / target / locality prompt, from counterfact-edit or KnowEdit wiki_counterfact train files."""
    name = Path(path).name
    if re.search(r"(test|val)", name) and not name.startswith("validation-"):  # splits of the train files
        raise SystemExit(f"{path}: sweeps tune on train splits only")
    records = []
    for r in json.loads(Path(path).read_text()):
        loc = r.get("locality_prompt")
        if loc is None and isinstance(r.get("locality"), dict):
            loc = next((item["prompt"] for items in r["locality"].values() for item in items), None)
        records.append({"prompt": r["prompt"], "target": r["target_new"], "locality": loc, "subject": r.get("subject"),
                        "truth": r.get("ground_truth") if isinstance(r.get("ground_truth"), str) else None})
    return records


def normalise(text: str) -> str:
    return re.sub(r"[^\w ]+", "", text.lower()).strip()


def answers(model, tokenizer, prompts: list[str]) -> list[str]:
    return generate_greedy(model, tokenizer, prompts, max_new_tokens=PROBE_TOKENS)


def succeeded(answer: str, target: str) -> bool:
    return normalise(answer).startswith(normalise(target))


@torch.no_grad()
def greedy_ids(model, tokenizer, prompts: list[str]) -> list[list[int]]:
    """The unedited model's greedy continuation ids of each probe (one prompt at a time: no padding)."""
    out = []
    for prompt in prompts:
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=PROBE_TOKENS, do_sample=False,
                             num_beams=1, pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None)
        out.append(gen[0, ids.shape[1]:].tolist())
    return out


@torch.no_grad()
def locality(model, tokenizer, prompts: list[str], base: list[list[int]]) -> tuple[float, float, list[float]]:
    """(exact, token, by_position): unchanged whole greedy output, unchanged teacher-forced argmax per
    token, and that agreement at each of the 6 positions (does damage sit in the answer or after it?)."""
    exact = agree = total = 0
    by_pos = torch.zeros(PROBE_TOKENS)
    seen = torch.zeros(PROBE_TOKENS)
    for prompt, ref in zip(prompts, base):
        p = tokenizer(prompt)["input_ids"]
        logits = model(torch.tensor([p + ref[:-1]]), logits_to_keep=len(ref)).logits[0]  # [len(ref), V]
        match = logits.argmax(-1) == torch.tensor(ref)
        agree += int(match.sum())
        total += len(ref)
        exact += int(match.all())  # all argmaxes equal under teacher forcing <=> same greedy output
        by_pos[:len(ref)] += match.float()
        seen[:len(ref)] += 1
    return exact / len(prompts), agree / total, [round(x, 3) for x in (by_pos / seen.clamp(min=1)).tolist()]


@torch.no_grad()
def given_argmax(model, tokenizer, pairs: list[tuple[str, list[int]]]) -> list[torch.Tensor]:
    """Per (prompt, answer ids): the argmax at each answer position, the answer teacher-forced."""
    out = []
    for prompt, answer in pairs:
        p = tokenizer(prompt)["input_ids"]
        logits = model(torch.tensor([p + answer[:-1]]), logits_to_keep=len(answer)).logits[0]
        out.append(logits.argmax(-1))
    return out


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model, "cpu")
    model, tokenizer = loaded.model, loaded.tokenizer
    records = load_records(args.data)
    facts = records[args.offset:args.offset + args.n]
    probes = list(dict.fromkeys(r["locality"] for r in records[args.offset:] if r["locality"]))[:args.probes]
    base = greedy_ids(model, tokenizer, probes)
    probes, base = [p for p, b in zip(probes, base) if b], [b for b in base if b]  # drop instant-EOS probes
    edited = {f["subject"] for f in facts}
    later = [r for r in records[args.offset + args.n:] if r["subject"] not in edited][:args.probes]
    unrelated = [r["prompt"] for r in later]
    truths = [(r["prompt"], tokenizer(" " + r["truth"].strip())["input_ids"]) for r in later if r["truth"]]
    truth_base = given_argmax(model, tokenizer, truths)
    unrelated_base = greedy_ids(model, tokenizer, unrelated)
    unrelated = [p for p, b in zip(unrelated, unrelated_base) if b]
    unrelated_base = [b for b in unrelated_base if b]
    editor = make_editor(args.method, model, tokenizer, **overrides(args.set))
    saved = snapshot(model, editor.parameter_names())
    now, steps, seconds = [], [], []
    for i, fact in enumerate(facts):
        ctx = tuple(template_contexts(fact["prompt"], fact["target"])) if args.contexts == "template" else ()
        result = editor.edit(EditRequest(fact["prompt"], fact["target"], contexts=ctx, fact_id=i,
                                         subject=fact["subject"]))
        answer = answers(model, tokenizer, [fact["prompt"]])[0]
        now.append(result.ok and succeeded(answer, fact["target"]))
        steps.append(result.steps)
        seconds.append(result.seconds)
        logging.info("%d/%d %s -> %r: %s steps=%d %.1fs %s", i + 1, len(facts), fact["prompt"], fact["target"],
                     "ok" if now[-1] else "MISS", result.steps, result.seconds, answer)
    final = answers(model, tokenizer, [f["prompt"] for f in facts])
    loc_exact, loc_token, loc_by_pos = locality(model, tokenizer, probes, base)
    unrel_exact, unrel_token, _ = locality(model, tokenizer, unrelated, unrelated_base)
    after = given_argmax(model, tokenizer, truths)
    unrel_gt = (sum(int((a == b).sum()) for a, b in zip(after, truth_base)) / max(1, sum(len(b) for b in truth_base)))
    restore(model, saved)
    return {"tag": args.tag, "method": args.method, "config": editor.config.to_dict(), "contexts": args.contexts,
            "data": Path(args.data).name, "n": len(facts), "offset": args.offset, "probes": len(probes),
            "success_now": sum(now) / len(facts),
            "success_all": sum(succeeded(a, f["target"]) for a, f in zip(final, facts)) / len(facts),
            "loc_exact": loc_exact, "loc_token": loc_token, "loc_by_pos": loc_by_pos,
            "unrel_exact": unrel_exact, "unrel_token": unrel_token, "unrel_gt": unrel_gt, "steps_mean": statistics.mean(steps),
            "seconds_median": statistics.median(seconds), "threads": args.threads}


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    row = run(args)
    row["wall_seconds"] = round(time.perf_counter() - start, 1)
    with open(args.out, "a") as fh:
        fh.write(json.dumps(row) + "\n")
    print(f"{row['tag'] or '-':24s} {row['method']:4s} now {row['success_now']:.2f} all {row['success_all']:.2f} "
          f"loc {row['loc_exact']:.2f} tok {row['loc_token']:.3f} unrel {row['unrel_exact']:.2f} "
          f"tok {row['unrel_token']:.3f} gt {row['unrel_gt']:.3f} steps {row['steps_mean']:.1f} "
          f"s/edit {row['seconds_median']:.1f}")


if __name__ == "__main__":
    main()
