"""Train the gist add-on only (gist embedding, zero-gist keys, adapters): `python -m editors.incomes.train`.

The base model stays frozen, so an empty pool keeps it bit-identical whatever the add-on learned.
Each step: draw a chunk of facts (8..128, the paper's probabilities), query B of them (edit prompt,
paraphrase or locality), compress the queried facts with gradients and the distractors without,
and minimise w * CE + KL(teacher || student) (objective.py). Runs resume from `RUN/checkpoint`
(safetensors only, no pickle); `RUN/log.jsonl` holds the curves; the trained add-on lands in `RUN/addon`
with its config and the exact command that made it.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from editors.incomes.compress import CompressedGists, add_gist_token, compress_texts
from editors.incomes.config import GistConfig
from editors.incomes.modules import GistAddon, replace_directory
from editors.incomes.objective import encode, heldout_check, student_loss, teacher_targets
from editors.incomes.traindata import CHUNK_PROBS, CHUNK_SIZES, ChunkSampler, load_train_facts, split_holdout
from memory.errors import ConfigError, EngramError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 8  # queried facts per step (all in the pool)
    lr: float = 1e-3
    warmup: int = 50
    min_lr_ratio: float = 0.1  # cosine decay to lr * this at the last step
    grad_clip: float = 1.0
    chunk_sizes: tuple[int, ...] = CHUNK_SIZES
    chunk_probs: tuple[float, ...] = CHUNK_PROBS
    locality_prob: float = 0.25
    paraphrase_prob: float = 0.5
    holdout: int = 200  # facts of the train files never trained on, for the periodic checks
    eval_every: int = 100
    eval_facts: int = 100
    save_every: int = 50
    bank_size: int = 0  # 0: compress each step's distractors afresh; >0: reuse a bank of this many
    bank_refresh: int = 50  # steps between recompressions of the distractor bank
    compress_batch: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "compress_batch", "bank_refresh"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1")
        for name in ("warmup", "holdout", "eval_every", "eval_facts", "save_every", "bank_size"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0")
        if not (self.lr > 0 and 0 <= self.min_lr_ratio <= 1 and self.grad_clip > 0):
            raise ConfigError("lr and grad_clip must be > 0 and min_lr_ratio in [0, 1]")
        if not (0 <= self.locality_prob <= 1 and 0 <= self.paraphrase_prob <= 1):
            raise ConfigError("locality_prob and paraphrase_prob must lie in [0, 1]")
        object.__setattr__(self, "chunk_sizes", tuple(self.chunk_sizes))
        object.__setattr__(self, "chunk_probs", tuple(self.chunk_probs))

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# -- checkpoints (safetensors + JSON, written to a temp dir and renamed into place) -----------------
def save_checkpoint(run_dir: Path, addon: GistAddon, opt: torch.optim.Optimizer, step: int, cfg: TrainConfig) -> None:
    from safetensors.torch import save_file

    tmp = Path(tempfile.mkdtemp(prefix="checkpoint.", dir=run_dir))
    addon.save(tmp / "addon")
    state = {}
    for index, entry in opt.state_dict()["state"].items():
        for key, value in entry.items():
            state[f"{index}.{key}"] = (value if torch.is_tensor(value) else torch.tensor(value)).detach().cpu()
    save_file(state, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step, "train_config": asdict(cfg)}, indent=2))
    replace_directory(tmp, run_dir / "checkpoint")


def load_checkpoint(run_dir: Path, model, opt_factory):
    """(addon, optimiser, next step) from RUN/checkpoint."""
    from safetensors.torch import load_file

    ckpt = run_dir / "checkpoint"
    addon = GistAddon.load(ckpt / "addon", model)
    opt = opt_factory(addon)
    saved = opt.state_dict()
    device = addon.gist_embedding.device
    state: dict = {}
    for name, tensor in load_file(str(ckpt / "optimizer.safetensors")).items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = tensor if key == "step" else tensor.to(device)
    saved["state"] = state
    opt.load_state_dict(saved)
    step = json.loads((ckpt / "state.json").read_text())["step"]
    return addon, opt, step


def _optimizer(addon: GistAddon) -> torch.optim.Optimizer:
    addon.requires_grad_(True)
    return torch.optim.AdamW(list(addon.parameters()), lr=1e-3, weight_decay=0.0)


# -- the loop ---------------------------------------------------------------------------------------
class DistractorBank:
    """A fixed random set of train facts whose gists are recompressed every `refresh` steps."""

    def __init__(self, facts, size: int, refresh: int, seed: int):
        import random

        self.ids = sorted(random.Random(seed + 7).sample(range(len(facts)), size))
        self.facts, self.refresh, self.gists, self.made_at = facts, refresh, None, None

    def gists_for(self, step: int, model, tokenizer, addon, batch: int) -> CompressedGists:
        if self.gists is None or step - self.made_at >= self.refresh:
            self.gists = compress_texts(model, tokenizer, addon, [self.facts[i].text for i in self.ids], batch)
            self.made_at = step
        return self.gists


def train_step(model, tokenizer, addon, opt, sampler, facts, step: int, cfg: TrainConfig, bank=None) -> dict:
    addon.train()
    device = addon.gist_embedding.device
    plan = sampler.step(step, facts, bank.ids if bank else None)
    enc = encode(tokenizer, plan.queries, [facts[i].text for i in plan.relevant], device)
    teacher, w = teacher_targets(model, addon, enc)
    relevant = compress_texts(model, tokenizer, addon, [facts[i].text for i in plan.relevant], cfg.compress_batch,
                              grad=True)
    if bank is not None:
        rows = [bank.ids.index(i) for i in plan.distractors]
        distractors = bank.gists_for(step, model, tokenizer, addon, cfg.compress_batch).select(rows)
    else:
        distractors = compress_texts(model, tokenizer, addon, [facts[i].text for i in plan.distractors],
                                     cfg.compress_batch)
    gists = CompressedGists.cat([relevant, distractors]) if len(distractors) else relevant
    for group in opt.param_groups:
        group["lr"] = cfg.lr_at(step)
    loss, stats = student_loss(model, addon, enc, gists, teacher, w)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(addon.parameters(), cfg.grad_clip))
    opt.step()
    return {**stats, "chunk": len(gists), "lr": cfg.lr_at(step)}


def train(model, tokenizer, facts, cfg: TrainConfig, gist_cfg: GistConfig, run_dir: str | Path,
          resume: bool = True, command: str | None = None) -> GistAddon:
    """Train (or resume) an add-on on `facts` (TrainFact list); returns it, also saved in RUN/addon."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    train_facts, holdout = split_holdout(facts, cfg.holdout, cfg.seed)
    gist_id = add_gist_token(tokenizer, gist_cfg.gist_token)
    if resume and (run_dir / "checkpoint" / "state.json").exists():
        addon, opt, start = load_checkpoint(run_dir, model, _optimizer)
        log.info("resuming %s at step %d", run_dir, start)
        if addon.config != gist_cfg:
            log.warning("resuming with the checkpoint's gist config %s, not %s", addon.config, gist_cfg)
    else:
        addon = GistAddon.for_model(model, gist_cfg)
        opt, start = _optimizer(addon), 0
    sampler = ChunkSampler(len(train_facts), cfg.batch_size, cfg.chunk_sizes, cfg.chunk_probs,
                           cfg.locality_prob, cfg.paraphrase_prob, cfg.seed)
    bank = DistractorBank(train_facts, cfg.bank_size, cfg.bank_refresh, cfg.seed) if cfg.bank_size else None
    addon.attach(model, gist_id)
    try:
        with open(run_dir / "log.jsonl", "a") as curve:
            for step in range(start, cfg.steps):
                began = time.perf_counter()
                stats = train_step(model, tokenizer, addon, opt, sampler, train_facts, step, cfg, bank)
                stats.update(step=step + 1, seconds=round(time.perf_counter() - began, 3))
                curve.write(json.dumps(stats) + "\n")
                curve.flush()
                log.info("step %d loss %.4f kl %.4f wce %.4f chunk %d (%.1fs)", step + 1, stats["loss"],
                         stats["kl"], stats["wce"], stats["chunk"], stats["seconds"])
                last = step + 1 == cfg.steps
                if cfg.save_every and ((step + 1) % cfg.save_every == 0 or last):
                    save_checkpoint(run_dir, addon, opt, step + 1, cfg)
                if cfg.eval_every and holdout and ((step + 1) % cfg.eval_every == 0 or last):
                    check = heldout_check(model, tokenizer, addon, holdout[: cfg.eval_facts])
                    curve.write(json.dumps({"step": step + 1, "heldout": check}) + "\n")
                    log.info("step %d held-out %s", step + 1, check)
    finally:
        addon.detach()
    addon.save(run_dir / "addon", extra={"command": command, "train_config": asdict(cfg), "steps": cfg.steps})
    return addon


# -- command line -----------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m editors.incomes.train", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--data-root", default=str(Path(__file__).resolve().parents[3] / "shared" / "data"))
    p.add_argument("--run-dir", default="runs/incomes")
    p.add_argument("--no-resume", action="store_true", help="start afresh even if RUN/checkpoint exists")
    p.add_argument("--max-facts", type=int, default=None, help="use only the first N facts (smoke runs)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--adapter-rank", type=int, default=8)
    p.add_argument("--gate-init", type=float, default=0.0,
                   help="per-head gate on the gist output; 0 starts exactly at the base model (PEFT-style); "
                        "pass nan for no gate (the paper's ungated branch)")
    p.add_argument("--log-level", default="INFO")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name in ("chunk_sizes", "chunk_probs"):
            p.add_argument(flag, default=",".join(map(str, f.default)), help="comma-separated")
        else:
            p.add_argument(flag, type=type(f.default), default=f.default)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
    values["chunk_sizes"] = tuple(int(x) for x in str(args.chunk_sizes).split(","))
    values["chunk_probs"] = tuple(float(x) for x in str(args.chunk_probs).split(","))
    try:
        from editors.model import load_model

        cfg = TrainConfig(**values)
        gate = None if args.gate_init != args.gate_init else args.gate_init  # nan -> no gate
        gist_cfg = GistConfig(adapter_rank=args.adapter_rank, gate_init=gate)
        facts = load_train_facts(args.data_root)[: args.max_facts]
        loaded = load_model(args.model, args.device)
        log.info("model %s on %s; %d facts", loaded.name, loaded.device, len(facts))
        command = "python -m editors.incomes.train " + shlex.join(argv)
        train(loaded.model, loaded.tokenizer, facts, cfg, gist_cfg, args.run_dir, not args.no_resume, command)
    except EngramError as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
