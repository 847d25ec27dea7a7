"""The gist trainer's settings, optimiser and resumable checkpoints (safetensors + JSON, no pickle)."""
from __future__ import annotations

import contextlib
import json
import math
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from editors.incomes.modules import GistAddon, replace_directory
from editors.incomes.traindata import CHUNK_PROBS, CHUNK_SIZES
from memory.errors import ConfigError

AMP_MODES = ("none", "bf16")
ZERO_KEY_INITS = ("zero", "sink")
FAST_PARAMS = ("gate", "zero_key", "gist_embedding", "later_gist_embeddings")  # names that get lr * fast_lr_mult


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000  # with time_budget: an upper bound only
    batch_size: int = 8  # queried facts per step (all in the pool)
    lr: float = 1e-3
    fast_lr_mult: float = 5.0  # lr multiplier of the gates, zero-gist keys, gist embedding, query-conditioned read
    warmup: int = 50
    min_lr_ratio: float = 0.1  # cosine decay to lr * this at the end (of the steps, or of the time budget)
    grad_clip: float = 1.0
    ce_weight: float = 0.3  # multiplies the w * CE term (KL has weight 1); the paper has 1
    locality_weight: float = 2.0  # multiplies the KL of locality queries' tokens
    zero_key_init: str = "sink"  # a fresh add-on's zero-gist keys start at the base's attention-sink key ("zero": 0)
    chunk_sizes: tuple[int, ...] = CHUNK_SIZES
    chunk_probs: tuple[float, ...] = CHUNK_PROBS
    curriculum: float = 0.0  # fraction of the run over which pools grow from the smallest chunk size
    shrink_batch: bool = False  # a pool smaller than batch_size is kept, all its facts queried (not raised)
    locality_prob: float = 0.3
    paraphrase_prob: float = 0.5
    period_prob: float = 0.3  # chance that a fact is written with a final period
    question_twins: float = 0.0  # fraction of train facts also given as "question? answer" (ZsRE's form)
    rare_answers: float = 0.0  # fraction of train facts also given with a made-up answer (copying, as ZsRE needs)
    long_answers: float = 0.0  # share of queried facts drawn from those whose answer has 2+ tokens (0: as they come)
    subject_locality: int = 0  # generated locality queries per train fact that ask its subject another relation
    after_answer: bool = False  # KL also at the position after each query's answer (what follows it)
    continuation_prob: float = 0.0  # chance a query goes on past its answer with another fact's sentence (KL)
    after_answer_weight: float = 1.0  # multiplies the KL at that position (greedy text after the answer)
    later_answer_weight: float = 1.0  # multiplies CE and KL on answer tokens after the first
    holdout: int = 300  # train facts never trained on (with seed 0: the validation split, docs/validation.md)
    eval_every: int = 100  # steps between held-out checks (0 = none)
    eval_seconds: float = 0.0  # also check every this many seconds (0 = off)
    eval_facts: int = 100  # gists in the held-out pool; the final check pools all `holdout` facts this many at a time
    save_every: int = 50  # steps between saves of RUN/addon and the checkpoint (0 = only at the end)
    save_seconds: float = 0.0  # also save every this many seconds (0 = off)
    time_budget: float = 0.0  # seconds for the whole run, final check and save included (0 = run `steps`)
    log_every: int = 1  # steps per log line (stats are averaged; fewer lines = fewer host syncs)
    distractor_grad: bool = False  # compress the distractors with gradients too (one forward for the pool)
    bank_size: int = 0  # 0: compress each step's distractors afresh; >0: reuse a bank of this many
    bank_refresh: int = 50  # steps between recompressions of the distractor bank
    compress_batch: int = 64
    eval_batch: int = 16
    amp: str = "none"  # "bf16": autocast the forwards (the add-on keeps float32 master weights)
    seed: int = 0
    data_seed: int | None = None  # seeds which facts each step draws (None: `seed`); the held-out split keeps `seed`

    @property
    def step_seed(self) -> int:
        """Seeds the per-step draws: give a warm start its own, or it sees its parent's batches again."""
        return self.seed if self.data_seed is None else self.data_seed

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "compress_batch", "bank_refresh", "log_every", "eval_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1")
        for name in ("warmup", "holdout", "eval_every", "eval_facts", "save_every", "bank_size", "eval_seconds",
                     "save_seconds", "time_budget", "ce_weight", "locality_weight", "subject_locality",
                     "after_answer_weight", "later_answer_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0")
        if not (self.lr > 0 and self.fast_lr_mult > 0 and 0 <= self.min_lr_ratio <= 1 and self.grad_clip > 0):
            raise ConfigError("lr, fast_lr_mult and grad_clip must be > 0 and min_lr_ratio in [0, 1]")
        for name in ("locality_prob", "paraphrase_prob", "period_prob", "curriculum", "question_twins",
                     "rare_answers", "long_answers", "continuation_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name} must lie in [0, 1]")
        if self.zero_key_init not in ZERO_KEY_INITS:
            raise ConfigError(f"zero_key_init must be one of {ZERO_KEY_INITS}, got {self.zero_key_init!r}")
        if self.amp not in AMP_MODES:
            raise ConfigError(f"amp must be one of {AMP_MODES}, got {self.amp!r}")
        object.__setattr__(self, "chunk_sizes", tuple(self.chunk_sizes))
        object.__setattr__(self, "chunk_probs", tuple(self.chunk_probs))

    def lr_at(self, step: int, progress: float | None = None) -> float:
        """Linear warmup over `warmup` steps, then cosine to lr * min_lr_ratio. `progress` in [0, 1] is
        the fraction of the run done (of the time budget when timed); None = step / steps."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        if progress is None:
            progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        progress = min(max(progress, 0.0), 1.0)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def amp_context(device: torch.device, amp: str):
    """Autocast for the forwards only (never around backward or the optimiser step: autocast caches
    casts of trained parameters for as long as its context lives)."""
    if amp == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# -- checkpoints (safetensors + JSON, written to a temp dir and renamed into place) -----------------
def save_checkpoint(ckpt_dir: Path, addon: GistAddon, opt: torch.optim.Optimizer, step: int, cfg: TrainConfig) -> None:
    """Add-on + optimiser state + step into `ckpt_dir` (e.g. RUN/checkpoint), atomically."""
    from safetensors.torch import save_file

    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=ckpt_dir.name + ".", dir=ckpt_dir.parent))
    addon.save(tmp / "addon")
    state = {}
    for index, entry in opt.state_dict()["state"].items():
        for key, value in entry.items():
            state[f"{index}.{key}"] = (value if torch.is_tensor(value) else torch.tensor(value)).detach().cpu()
    save_file(state, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step, "train_config": asdict(cfg)}, indent=2))
    replace_directory(tmp, ckpt_dir)


def load_checkpoint(ckpt_dir: Path, model, opt_factory, dtype: torch.dtype | None = None):
    """(addon, optimiser, next step) from a checkpoint directory (e.g. RUN/checkpoint)."""
    from safetensors.torch import load_file

    ckpt = Path(ckpt_dir)
    addon = GistAddon.load(ckpt / "addon", model)
    if dtype is not None:
        addon.to(dtype=dtype)
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


def make_optimizer(addon: GistAddon, cfg: TrainConfig | None = None) -> torch.optim.Optimizer:
    """AdamW over all add-on parameters; gates, zero-gist keys and the gist embedding in a group whose
    lr is `fast_lr_mult` times the base lr (they start at 0 / the mean row and gate everything else)."""
    addon.requires_grad_(True)
    mult = cfg.fast_lr_mult if cfg is not None else 1.0
    fast, slow = [], []
    for name, param in addon.named_parameters():
        fresh_read = ".read." in name  # a query-conditioned read grown on a warm start starts from zero
        (fast if name.split(".")[-1] in FAST_PARAMS or fresh_read else slow).append(param)
    groups = [{"params": slow, "mult": 1.0}, {"params": fast, "mult": mult}]
    cuda = all(p.is_cuda for p in addon.parameters())
    kwargs = {"fused": True} if cuda else {}
    return torch.optim.AdamW(groups, lr=cfg.lr if cfg else 1e-3, weight_decay=0.0, **kwargs)
