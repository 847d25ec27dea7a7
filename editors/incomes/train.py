"""Train the gist add-on only (gist embedding, zero-gist keys, adapters): `python -m editors.incomes.train`.

The base model stays frozen, so an empty pool keeps it bit-identical whatever the add-on learned.
Each step: draw a pool of facts (the paper's chunk sizes, or a small-to-large curriculum), query B of
them (edit prompt, paraphrase or locality), compress the pool in one batched forward (the queried facts
with gradients; the distractors too with --distractor-grad), and minimise w * CE + KL(teacher || student)
(objective.py). Runs resume from the checkpoint (safetensors only, no pickle); `RUN/log.jsonl` holds the
curves; the trained add-on lands in `RUN/addon` (and the best held-out one in `RUN/best`) with its config
and the exact command that made it. With --time-budget S the run trains until S seconds minus the time
its final held-out check and save will take, then checks and saves: made for a lent GPU.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import random
import shlex
import sys
import time
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch

from editors.incomes.compress import CompressedGists, add_gist_token, compress_ids, init_zero_keys_at_sink
from editors.incomes.config import GistConfig
from editors.incomes.modules import GistAddon
from editors.incomes.train_config import (AMP_MODES, ZERO_KEY_INITS, TrainConfig, amp_context,  # noqa: F401
                                          load_checkpoint, make_optimizer, save_checkpoint)
from editors.incomes.objective import Tokens, continuations, encode, heldout_check, student_loss, teacher_targets
from editors.incomes.rare_answers import rare_answer_twins
from editors.incomes.traindata import (ChunkSampler, fact_text, load_train_facts, split_holdout,
                                       with_question_twins, with_subject_locality)
from memory.errors import EngramError

log = logging.getLogger(__name__)

OOM_ERRORS = (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), torch.cuda.OutOfMemoryError)
MAX_OOMS = 5  # more than this many skipped steps and the run stops (the latest save stays)


# -- the loop ---------------------------------------------------------------------------------------
class DistractorBank:
    """A fixed random set of train facts whose gists are recompressed every `refresh` steps."""

    def __init__(self, facts, size: int, refresh: int, seed: int):
        self.ids = sorted(random.Random(seed + 7).sample(range(len(facts)), size))
        self.row = {fact: row for row, fact in enumerate(self.ids)}
        self.facts, self.refresh, self.gists, self.made_at = facts, refresh, None, None

    def gists_for(self, step: int, model, tokens: Tokens, addon, batch: int) -> CompressedGists:
        if self.gists is None or step - self.made_at >= self.refresh:
            self.gists = compress_ids(model, addon, [tokens.text(self.facts[i].text) for i in self.ids], batch,
                                      pad_id=tokens.pad)
            self.made_at = step
        return self.gists


def train_step(model, tokens: Tokens, addon, opt, sampler, facts, step: int, cfg: TrainConfig, bank=None,
               progress: float | None = None) -> dict:
    """One optimiser step. Returns detached 0-d tensors and plain numbers (no host sync)."""
    addon.train()
    device = addon.gist_embedding.device
    plan = sampler.step(step, facts, bank.ids if bank else None, progress)
    rng = random.Random(cfg.step_seed * 7919 + step)
    rel_texts = [fact_text(facts[i], rng, cfg.period_prob) for i in plan.relevant]
    ids = lambda texts: [tokens.text(t) for t in texts]  # noqa: E731
    with amp_context(device, cfg.amp):
        enc = encode(tokens, plan.queries, rel_texts, device, after_answer=cfg.after_answer,
                     continuations=continuations(tokens, facts, len(plan.queries), rng, cfg.continuation_prob))
        teacher, w = teacher_targets(model, addon, enc)
        if bank is not None:
            relevant = compress_ids(model, addon, ids(rel_texts), cfg.compress_batch, grad=True, pad_id=tokens.pad)
            rows = [bank.row[i] for i in plan.distractors]
            distractors = bank.gists_for(step, model, tokens, addon, cfg.compress_batch).select(rows)
            gists = CompressedGists.cat([relevant, distractors]) if rows else relevant
        else:
            dis_texts = [fact_text(facts[i], rng, cfg.period_prob) for i in plan.distractors]
            if cfg.distractor_grad:  # the whole pool in one batched forward, all with gradients
                gists = compress_ids(model, addon, ids(rel_texts + dis_texts), cfg.compress_batch, grad=True,
                                     pad_id=tokens.pad)
            else:
                relevant = compress_ids(model, addon, ids(rel_texts), cfg.compress_batch, grad=True,
                                        pad_id=tokens.pad)
                distractors = compress_ids(model, addon, ids(dis_texts), cfg.compress_batch, pad_id=tokens.pad)
                gists = CompressedGists.cat([relevant, distractors]) if dis_texts else relevant
        lr = cfg.lr_at(step, progress)
        for group in opt.param_groups:
            group["lr"] = lr * group.get("mult", 1.0)
        loss, stats = student_loss(model, addon, enc, gists, teacher, w, cfg.ce_weight, cfg.locality_weight,
                                   cfg.after_answer_weight, cfg.later_answer_weight)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(addon.parameters(), cfg.grad_clip).detach()
    opt.step()
    return {**stats, "chunk": len(gists), "lr": lr}


def _gate_mean(addon: GistAddon) -> float | None:
    gates = [b.gate for b in addon.branches.values() if b.gate is not None]
    return float(torch.stack([g.detach().abs().mean() for g in gates]).mean()) if gates else None


def _score(check: dict) -> float:
    """Model selection on the held-out slice: edit success, minus a penalty below 0.95 locality."""
    return check.get("edit_success", 0.0) - 5 * max(0.0, 0.95 - check.get("locality", 1.0))


def _summary(step: int, seconds: float, check: dict, label: str = "check") -> str:
    parts = [f"{label} step {step} t={seconds:.0f}s gists={check.get('n_gists')}"]
    for name in ("edit_success", "later_tokens", "rephrase", "locality", "subject_locality"):
        if name in check:
            base = f" (base {check[name + '_base']:.3f})" if name + "_base" in check else ""
            parts.append(f"{name} {check[name]:.3f}{base}")
    if "temperature" in check:
        parts.append(f"T={check['temperature']}")
    return " | ".join(parts)


def train(model, tokenizer, facts, cfg: TrainConfig, gist_cfg: GistConfig, run_dir: str | Path,
          resume: bool = True, command: str | None = None, checkpoint_dir: str | Path | None = None,
          init_addon: str | Path | None = None) -> GistAddon:
    """Train (or resume) an add-on on `facts` (TrainFact list); returns it, also saved in RUN/addon.

    With cfg.time_budget the whole call (setup, training, final check, save) aims to fit the budget."""
    began = time.monotonic()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir else run_dir / "checkpoint"
    torch.manual_seed(cfg.seed)
    train_facts, holdout = split_holdout(facts, cfg.holdout, cfg.seed)
    train_facts = (with_question_twins(train_facts, cfg.question_twins, cfg.seed)  # twins of train facts only
                   + rare_answer_twins(train_facts, cfg.rare_answers, cfg.seed))
    train_facts = with_subject_locality(train_facts, cfg.subject_locality, cfg.seed)
    facts = train_facts + holdout
    gist_id = add_gist_token(tokenizer, gist_cfg.gist_token)
    model_dtype = model.get_input_embeddings().weight.dtype
    master = torch.float32 if cfg.amp != "none" else model_dtype  # float32 master weights under autocast
    factory = lambda a: make_optimizer(a, cfg)  # noqa: E731
    if resume and (ckpt_dir / "state.json").exists():
        addon, opt, start = load_checkpoint(ckpt_dir, model, factory, master)
        log.info("resuming %s at step %d", ckpt_dir, start)
        if addon.config != gist_cfg:
            log.warning("resuming with the checkpoint's gist config %s, not %s", addon.config, gist_cfg)
    elif init_addon:  # warm start: a trained add-on's weights, a fresh optimiser and schedule
        addon = GistAddon.load(init_addon, model).to(dtype=master).grown_to(gist_cfg)
        opt, start = factory(addon), 0
        log.info("starting from the add-on in %s", init_addon)
    else:
        addon = GistAddon.for_model(model, gist_cfg).to(dtype=master)
        opt, start = factory(addon), 0
    device = addon.gist_embedding.device
    tokens = Tokens(tokenizer)
    texts = [f.text for f in facts] + ([f.text + "." for f in facts] if cfg.period_prob else [])
    tokens.warm(texts, [q for f in facts for q in (f.edit, *f.paraphrases, *f.locality)])
    long_answer = [len(ids) - start >= 2 for ids, start in (tokens.query(f.edit.prompt, f.edit.answer)
                                                            for f in train_facts)] if cfg.long_answers else None
    if long_answer:
        log.info("long answers: %d of %d train facts; drawn as %.0f%% of queries", sum(long_answer),
                 len(long_answer), 100 * cfg.long_answers)
    sampler = ChunkSampler(len(train_facts), cfg.batch_size, cfg.chunk_sizes, cfg.chunk_probs,
                           cfg.locality_prob, cfg.paraphrase_prob, cfg.step_seed, cfg.curriculum, cfg.shrink_batch,
                           long_answer, cfg.long_answers)
    bank = DistractorBank(train_facts, cfg.bank_size, cfg.bank_refresh, cfg.seed) if cfg.bank_size else None
    n_params = sum(p.numel() for p in addon.parameters())
    log.info("add-on: %d parameters (%.1f MB float32); %d train facts, %d held out; device %s, amp %s",
             n_params, n_params * 4 / 1e6, len(train_facts), len(holdout), device, cfg.amp)
    eval_set = holdout[: cfg.eval_facts]
    timed = cfg.time_budget > 0
    deadline = began + cfg.time_budget
    saved_extra = {"command": command, "train_config": asdict(cfg)}
    state = {"best": None, "check_s": None, "save_s": 0.5, "ooms": 0}

    def check(step: int, facts_, label: str, temperature: float | None = None) -> dict:
        t0 = time.monotonic()
        if temperature is not None:
            original, addon.config = addon.config, replace(addon.config, temperature=temperature)
        try:
            with amp_context(device, cfg.amp):
                result = heldout_check(model, tokenizer, addon, facts_, cfg.eval_batch, cfg.eval_facts or None,
                                       tokens, cfg.compress_batch)
        finally:
            if temperature is not None:
                addon.config = original
        cfg_t = addon.config
        result["temperature"] = temperature if temperature is not None else (
            cfg_t.temperature if result["n_gists"] > cfg_t.temperature_min_gists else 1.0)
        seconds = time.monotonic() - t0
        groups = max(1, math.ceil(len(facts_) / max(1, cfg.eval_facts or len(facts_))))
        state["check_s"] = seconds / groups  # per pool checked
        curve.write(json.dumps({"step": step, label: True, "heldout": result, "seconds": round(seconds, 2),
                                "elapsed": round(time.monotonic() - began, 1)}) + "\n")
        curve.flush()
        log.info("%s", _summary(step, time.monotonic() - began, result, label))
        return result

    def keep_best(step: int, result: dict) -> None:
        score = _score(result)
        if state["best"] is None or score > state["best"]:
            state["best"] = score
            addon.save(run_dir / "best", extra={**saved_extra, "steps": step, "heldout": result})

    def save(step: int) -> None:
        t0 = time.monotonic()
        addon.save(run_dir / "addon", extra={**saved_extra, "steps": step})
        save_checkpoint(ckpt_dir, addon, opt, step, cfg)
        state["save_s"] = time.monotonic() - t0

    def margin() -> float:
        """Seconds to keep for the final checks (all held-out pools, two temperatures) and saves."""
        if not timed:
            return 0.0
        groups = max(1, math.ceil(len(holdout) / max(1, cfg.eval_facts or len(holdout)))) if holdout else 0
        per_pool = state["check_s"] if state["check_s"] is not None else 5.0
        return 2.0 + 1.5 * (2 * groups * per_pool + 3 * state["save_s"])

    addon.attach(model, gist_id)
    step, final = start, None
    try:
        if start == 0 and cfg.zero_key_init == "sink" and not init_addon:  # a warm start keeps its trained keys
            with amp_context(device, cfg.amp):
                init_zero_keys_at_sink(model, addon, [tokens.text(f.text) for f in train_facts[:64]], tokens.pad)
        with open(run_dir / "log.jsonl", "a") as curve:
            if timed and eval_set and cfg.eval_facts:
                keep_best(step, check(step, eval_set, "check"))  # the baseline, and the check's cost
            loop_start = time.monotonic()
            last_save, last_eval = loop_start, loop_start
            acc = {"sums": {}, "n": 0, "t": loop_start}

            def flush(step: int, lr: float, progress: float | None) -> None:
                """One averaged log line for the steps since the last one (one host sync)."""
                sums, n_sum = acc["sums"], acc["n"]
                if not n_sum:
                    return
                keys = [k for k, v in sums.items() if torch.is_tensor(v)]
                values = torch.stack([sums[k].float() for k in keys]).tolist() if keys else []
                elapsed = time.monotonic() - acc["t"]
                row = {k: round(v / n_sum, 5) for k, v in zip(keys, values)}
                row.update(step=step, chunk=round(sums["chunk"] / n_sum, 1), lr=lr, seconds=round(elapsed / n_sum, 4),
                           steps_per_s=round(n_sum / max(elapsed, 1e-9), 2),
                           elapsed=round(time.monotonic() - began, 1), gate=_gate_mean(addon))
                if progress is not None:
                    row["progress"] = round(progress, 4)
                curve.write(json.dumps(row) + "\n")
                curve.flush()
                log.info("step %d loss %.4f kl %.4f wce %.4f acc %.3f loc-agree %.3f gate %.3f chunk %.0f "
                         "lr %.2e %.2f steps/s", step, row["loss"], row["kl"], row["wce"], row["acc_answer"],
                         row["agree_locality"], row["gate"] or 0.0, row["chunk"], row["lr"], row["steps_per_s"])
                acc.update(sums={}, n=0, t=time.monotonic())

            while step < cfg.steps:
                now = time.monotonic()
                if timed and now >= deadline - margin():
                    break
                progress = None
                if timed:
                    progress = (now - loop_start) / max(1e-3, deadline - margin() - loop_start)
                elif cfg.curriculum:
                    progress = step / cfg.steps
                try:
                    stats = train_step(model, tokens, addon, opt, sampler, train_facts, step, cfg, bank, progress)
                except OOM_ERRORS:  # a rare big pool of long facts: skip this step's data, keep the run
                    state["ooms"] += 1
                    opt.zero_grad(set_to_none=True)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    log.warning("step %d ran out of memory (%d so far); its data is skipped", step + 1, state["ooms"])
                    curve.write(json.dumps({"step": step + 1, "oom": True}) + "\n")
                    if state["ooms"] > MAX_OOMS:
                        raise
                    step += 1
                    continue
                step += 1
                for key, value in stats.items():
                    acc["sums"][key] = acc["sums"].get(key, 0) + value
                acc["n"] += 1
                last = step == cfg.steps
                if step % cfg.log_every == 0 or last:
                    flush(step, stats["lr"], progress)
                now = time.monotonic()
                if not last and ((cfg.save_every and step % cfg.save_every == 0)
                                 or (cfg.save_seconds and now - last_save >= cfg.save_seconds)):
                    save(step)
                    last_save = time.monotonic()
                if not last and eval_set and cfg.eval_facts and (
                        (cfg.eval_every and step % cfg.eval_every == 0)
                        or (cfg.eval_seconds and now - last_eval >= cfg.eval_seconds)):
                    keep_best(step, check(step, eval_set, "check"))
                    last_eval = time.monotonic()
            if acc["n"]:
                flush(step, cfg.lr_at(step - 1, progress), progress)  # the steps since the last line
            if holdout and cfg.eval_facts:
                final = check(step, holdout, "final")  # all held-out pools, at the add-on's own temperature
                keep_best(step, final)
                if final["temperature"] != 1.0 and (not timed or time.monotonic() < deadline - 3):
                    check(step, holdout, "final_t1", temperature=1.0)  # the same, without the inference T
    finally:
        addon.detach()
    saved_extra.update(steps=step, seconds=round(time.monotonic() - began, 1), heldout=final)
    addon.save(run_dir / "addon", extra={**saved_extra})
    save_checkpoint(ckpt_dir, addon, opt, step, cfg)
    log.info("saved %s (step %d, %.0f s)", run_dir / "addon", step, time.monotonic() - began)
    return addon


# -- command line -----------------------------------------------------------------------------------
def _bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {text!r}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m editors.incomes.train", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--data-root", default=str(Path(__file__).resolve().parents[3] / "shared" / "data"))
    p.add_argument("--run-dir", default="runs/incomes")
    p.add_argument("--checkpoint-dir", default=None,
                   help="where the resumable checkpoint goes (default RUN/checkpoint)")
    p.add_argument("--no-resume", action="store_true", help="start afresh even if a checkpoint exists")
    p.add_argument("--init-addon", default=None, help="start from this trained add-on directory (warm start)")
    p.add_argument("--max-facts", type=int, default=None, help="use only the first N facts (smoke runs)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--adapter-rank", type=int, default=16)
    p.add_argument("--adapter-alpha", type=float, default=16.0)
    p.add_argument("--gate-init", type=float, default=0.0,
                   help="per-head gate on the gist output; 0 starts exactly at the base model (PEFT-style); "
                        "pass nan for no gate (the paper's ungated branch)")
    p.add_argument("--zero-key-init-std", type=float, default=0.0)
    p.add_argument("--read-rank", type=int, default=0,
                   help="rank of the query-conditioned gist read (0: none); a warm start grows one")
    p.add_argument("--gists-per-fact", type=int, default=1,
                   help="<GIST> tokens after each fact (memory per fact grows with it); a warm start grows them")
    p.add_argument("--log-level", default="INFO")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name in ("chunk_sizes", "chunk_probs"):
            p.add_argument(flag, default=",".join(map(str, f.default)), help="comma-separated")
        elif f.name == "amp":
            p.add_argument(flag, default=f.default, choices=AMP_MODES,
                           help="bf16: the frozen base in bfloat16 and autocast forwards; the add-on stays float32")
        elif f.name == "zero_key_init":
            p.add_argument(flag, default=f.default, choices=ZERO_KEY_INITS,
                           help="sink: start the zero-gist keys at the base model's attention-sink key")
        elif f.name == "data_seed":
            p.add_argument(flag, type=int, default=None, help="seeds each step's draws (default: --seed)")
        elif isinstance(f.default, bool):
            p.add_argument(flag, type=_bool, default=f.default, help="true/false")
        else:
            p.add_argument(flag, type=type(f.default), default=f.default)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    if args.threads:
        torch.set_num_threads(args.threads)
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
    values["chunk_sizes"] = tuple(int(x) for x in str(args.chunk_sizes).split(","))
    values["chunk_probs"] = tuple(float(x) for x in str(args.chunk_probs).split(","))
    try:
        from editors.model import load_model

        cfg = TrainConfig(**values)
        gate = None if args.gate_init != args.gate_init else args.gate_init  # nan -> no gate
        gist_cfg = GistConfig(adapter_rank=args.adapter_rank, adapter_alpha=args.adapter_alpha, gate_init=gate,
                              zero_key_init_std=args.zero_key_init_std, read_rank=args.read_rank,
                              gists_per_fact=args.gists_per_fact)
        facts = load_train_facts(args.data_root)[: args.max_facts]
        loaded = load_model(args.model, args.device)
        if loaded.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls on tensor cores
            torch.backends.cudnn.allow_tf32 = True
        if cfg.amp == "bf16":
            loaded.model.to(torch.bfloat16)  # the frozen base in bf16: no per-op weight casts
        log.info("model %s on %s (load %.1fs); %d facts", loaded.name, loaded.device, loaded.seconds, len(facts))
        command = "python -m editors.incomes.train " + shlex.join(argv)
        train(loaded.model, loaded.tokenizer, facts, cfg, gist_cfg, args.run_dir, not args.no_resume, command,
              args.checkpoint_dir, args.init_addon)
    except EngramError as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
