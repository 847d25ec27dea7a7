"""The preserved keys of the edited matrices, and the projector onto their null space (AlphaEdit's idea).

A down projection W maps its input k (the MLP's hidden activation) to W k. An update D with D k = 0 leaves
the output on k unchanged, so projecting every update as D <- D P, where P projects onto the directions
that general text barely uses, keeps what the model says about text that was never edited. The keys are
collected once per model over text the base model generates itself (never evaluation data), kept as the
second moment E[k k^T] per matrix, and cached as safetensors beside the model cache.

The keys of applied edits grow the preserved set: `Preserved.projector` removes their directions (after
the general-text projection) too, so a later edit cannot move the outputs an earlier edit set.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from memory.atomic import atomic_write

log = logging.getLogger(__name__)

STATS_FORMAT = 1
SEED_PROMPTS = ("The", "In", "A", "It", "My", "Question:", "When", "This", "We", "There", "One", "Today",
                "According to", "Many", "How", "After", "The capital of", "She was born in", "His team",
                "The company", "Who is", "What is the", "The city", "The song")  # the model writes the rest


@dataclass(frozen=True)
class StatsConfig:
    """How the general-text sample is drawn (part of the cache key)."""

    n_texts: int = 256
    text_tokens: int = 64
    seed: int = 0
    batch: int = 32


def stats_dir() -> Path:
    from editors.model import cache_root

    return cache_root() / "key-stats"


def _matrix(model: torch.nn.Module, name: str) -> torch.nn.Module:
    return model.get_submodule(name.removesuffix(".weight"))


def model_key(model: torch.nn.Module, names: Sequence[str], cfg: StatsConfig) -> str:
    """Which model and sample the statistics belong to: the matrices' names and shapes, the sample's
    settings, and a hash of the input embedding (the edited matrices themselves change with each edit)."""
    emb = model.get_input_embeddings().weight.detach()
    digest = hashlib.sha256(emb[:: max(1, emb.shape[0] // 512)].float().cpu().numpy().tobytes())
    shapes = {n: list(_matrix(model, n).weight.shape) for n in names}
    digest.update(json.dumps({"format": STATS_FORMAT, "shapes": shapes, "cfg": cfg.__dict__}, sort_keys=True).encode())
    return digest.hexdigest()[:16]


@torch.no_grad()
def general_text(model, tokenizer, cfg: StatsConfig) -> list[torch.Tensor]:
    """Token ids of text the model samples from short generic starts (temperature 1, seeded)."""
    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(cfg.seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    texts: list[torch.Tensor] = []
    for start in range(0, cfg.n_texts, cfg.batch):
        n = min(cfg.batch, cfg.n_texts - start)
        prompts = [SEED_PROMPTS[(start + i) % len(SEED_PROMPTS)] for i in range(n)]
        encoded = [tokenizer(p)["input_ids"] for p in prompts]
        width = max(map(len, encoded))
        ids = torch.full((n, width), pad, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, row in enumerate(encoded):  # left padding, so every row continues from its last column
            ids[i, width - len(row):], attn[i, width - len(row):] = torch.tensor(row), 1
        torch.manual_seed(int(torch.randint(1 << 30, (1,), generator=generator)))
        out = model.generate(ids.to(device), attention_mask=attn.to(device), max_new_tokens=cfg.text_tokens,
                             do_sample=True, temperature=1.0, top_p=1.0, top_k=0, pad_token_id=pad)
        log.info("preserved-key statistics: sampled %d of %d texts", start + n, cfg.n_texts)
        for i in range(n):
            row = out[i, width - len(encoded[i]):].cpu()
            eos = (row[len(encoded[i]):] == tokenizer.eos_token_id).nonzero()
            texts.append(row[: len(encoded[i]) + int(eos[0]) + 1] if len(eos) else row)
    return texts


@torch.no_grad()
def second_moments(model, texts: Sequence[torch.Tensor], names: Sequence[str], batch: int = 32
                   ) -> tuple[dict[str, torch.Tensor], int]:
    """E[k k^T] (float64, [in, in]) of every named matrix's input over all tokens of `texts`."""
    device = next(model.parameters()).device
    sums: dict[str, torch.Tensor] = {}
    mask_now: list[torch.Tensor] = []

    def hook(name):
        def collect(module, args):
            x = args[0].reshape(-1, args[0].shape[-1])[mask_now[0]].float()  # real tokens only
            sums[name] = sums.get(name, 0) + (x.T @ x).double()  # float32 per batch, float64 across them
        return collect

    handles = [_matrix(model, n).register_forward_pre_hook(hook(n)) for n in names]
    count = 0
    try:
        for start in range(0, len(texts), batch):
            rows = texts[start:start + batch]
            width = max(len(r) for r in rows)
            ids = torch.zeros((len(rows), width), dtype=torch.long)
            attn = torch.zeros_like(ids)
            for i, r in enumerate(rows):
                ids[i, :len(r)], attn[i, :len(r)] = r, 1
            mask_now[:] = [attn.reshape(-1).bool().to(device)]
            model(input_ids=ids.to(device), attention_mask=attn.to(device), use_cache=False, logits_to_keep=1)
            count += int(attn.sum())
    finally:
        for h in handles:
            h.remove()
    return {n: (s / max(count, 1)).cpu() for n, s in sums.items()}, count


def load_or_collect(model, tokenizer, names: Sequence[str], cfg: StatsConfig = StatsConfig(),
                    directory: Path | None = None) -> dict[str, torch.Tensor]:
    """The cached second moments for this model, collected (and cached) on first use."""
    from safetensors.torch import load_file, save_file

    path = (directory or stats_dir()) / f"{model_key(model, names, cfg)}.safetensors"
    if path.exists():
        try:
            moments = load_file(str(path))
            if set(names) <= set(moments):
                return {n: moments[n] for n in names}
        except Exception as exc:  # a damaged cache is collected again, not trusted
            log.warning("key statistics %s unreadable (%s); collecting them again", path, exc)
    start = time.perf_counter()
    # a warning, so that a command's first weight edit says why it waits (once per model and machine)
    log.warning("collecting the preserved-key statistics for this model (once; a few minutes on a CPU) -> %s", path)
    texts = general_text(model, tokenizer, cfg)
    moments, count = second_moments(model, texts, names, cfg.batch)
    moments = {n: m.float().contiguous() for n, m in moments.items()}  # as cached: one answer either way
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file(moments, str(tmp),
                                             metadata={"tokens": str(count), "names": json.dumps(list(names))}))
    log.info("collected preserved-key statistics over %d tokens in %.1f s -> %s", count,
             time.perf_counter() - start, path)
    return moments


def null_basis(moment: torch.Tensor, energy: float) -> torch.Tensor:
    """U [in, r], orthonormal: the least-used eigen-directions of E[k k^T] that together hold at most `energy`
    of the keys' energy (a fraction of the trace; scale-free, so one setting fits every layer). The
    projector is U U^T; kept as U, an update is projected in O(out x in x r), not O(out x in^2)."""
    values, vectors = torch.linalg.eigh(moment.double())  # ascending
    share = values.clamp(min=0).cumsum(0) / values.clamp(min=0).sum().clamp(min=1e-30)
    return vectors[:, share <= energy].float().contiguous()


def remove_directions(basis: torch.Tensor, keys: torch.Tensor, tol: float = 1e-3) -> torch.Tensor:
    """A basis of span(`basis`) without the directions of `keys` [n, in] inside it: outputs on those keys
    are then kept too."""
    coords = keys.float() @ basis  # [n, r]: what the projector still lets through of each key
    coords = coords[coords.norm(dim=1) > tol * keys.float().norm(dim=1).clamp(min=1e-12)]
    if not len(coords):
        return basis
    _, s, vh = torch.linalg.svd(coords, full_matrices=False)
    taken = vh[s > tol * s[0]].T  # [r, k]: the keys' directions, in the basis' coordinates
    q, _ = torch.linalg.qr(taken, mode="complete")  # [r, r]: its first k columns span `taken`
    return (basis @ q[:, taken.shape[1]:]).contiguous()


def project(delta: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """delta U U^T: the part of an update that moves no output on a preserved key ([out, in] for nn.Linear,
    [in, out] for GPT-2's Conv1D)."""
    if delta.shape[1] == basis.shape[0]:
        return (delta @ basis) @ basis.T
    return basis @ (basis.T @ delta)


@dataclass
class Preserved:
    """The general-text projectors and the keys of applied edits (by fact id), per edited matrix.
    Each edit's keys take their directions out of the projector, until only `min_free` of the general-text
    null space would be left: later keys are then kept by the box alone (a hard set would leave no room)."""

    base: dict[str, torch.Tensor]  # name -> U0, the general-text null-space basis
    min_free: float = 0.25
    edit_keys: dict[object, dict[str, torch.Tensor]] = field(default_factory=dict)
    _cached: dict[str, torch.Tensor] | None = None

    def projector(self) -> dict[str, torch.Tensor]:
        """name -> the basis U of the directions an edit may still move (the projector is U U^T)."""
        if self._cached is None:
            self._cached = dict(self.base)
            for keys in self.edit_keys.values():
                self._take_out(keys)
        return self._cached

    def free_dims(self) -> dict[str, int]:
        return {n: int(u.shape[1]) for n, u in self.projector().items()}

    def add(self, fact_id, keys: dict[str, torch.Tensor]) -> None:
        self.edit_keys[fact_id] = keys
        if self._cached is not None:
            self._take_out(keys)

    def keep_only(self, fact_ids) -> None:
        wanted = set(fact_ids)
        if set(self.edit_keys) - wanted:
            self.edit_keys = {f: k for f, k in self.edit_keys.items() if f in wanted}
            self._cached = None

    def project_update(self, name: str, delta: torch.Tensor) -> torch.Tensor:
        return project(delta, self.projector()[name])

    def direction(self, name: str, key: torch.Tensor) -> torch.Tensor:
        """The update's input direction for subject key `key` [in]: its part in the free directions."""
        basis = self.projector()[name]
        return basis @ (basis.T @ key)

    def _take_out(self, keys: dict[str, torch.Tensor]) -> None:
        for name, basis in self._cached.items():
            if name in keys:
                smaller = remove_directions(basis, keys[name])
                if smaller.shape[1] >= self.min_free * self.base[name].shape[1]:
                    self._cached[name] = smaller


@torch.no_grad()
def edit_keys(model, ids: torch.Tensor, positions: Sequence[int], names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The named matrices' inputs at `positions` of one sequence `ids` [L]: the keys an edit wrote to."""
    found: dict[str, torch.Tensor] = {}

    def hook(name):
        def collect(module, args):
            found[name] = args[0][0, list(positions)].detach().float().cpu()
        return collect

    handles = [_matrix(model, n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        model(input_ids=ids[None], use_cache=False, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    return found
