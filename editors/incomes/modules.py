"""The InComeS add-on: gist cross-attention for the upper layers, a gist embedding, and LoRA adapters.

Shapes: B batch, T tokens, C hidden, H query heads, KVH key/value heads, D head_dim, N gists.

For one upper layer, with h the attention's input and y the self-attention output before o_proj:

    q   = RoPE(q_norm(q_proj(h) + lora_q(h)))              [B, H, T, D]   the layer's own queries
    K   = [zero_key; gist keys]  (pre-RoPE, GQA-expanded)  [N+1, H, D]
    V   = [0;        gist values]                          [N+1, H, D]
    g   = softmax(q K^T * scaling / T) V                   [B, H, T, D]   its own softmax
    y'  = y + read * (g + lora_out(g) + R(g, h))           [B, T, H*D]    then the layer's o_proj

R(g, h) = B(A_g(g) * A_h(h)) is the query-conditioned read (GistConfig.read_rank; absent at 0): with one
gist, g is the same vector at every position up to a scale per head, and R lets the position choose.

The add-on never replaces a base module: it is attached with forward hooks (hooks.py), so the base
state-dict keys and tensors stay exactly as they were, and an empty pool skips the branch entirely.
Its own weights are saved alone, with a JSON config (the shape of PEFT's adaption_prompt).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from editors.incomes import hooks
from editors.incomes.config import GistConfig
from editors.incomes.introspect import GistHookError, ModelDims, model_dims, rope_function
from memory.errors import ConfigError

log = logging.getLogger(__name__)

ADDON_FORMAT = 1
WEIGHTS_FILE = "gist_addon.safetensors"
CONFIG_FILE = "gist_addon.json"


def replace_directory(tmp: Path, directory: Path) -> None:
    """Put the finished directory `tmp` in place of `directory` (renames only; the old one is dropped)."""
    old = directory.with_name(directory.name + ".old")
    if directory.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


class LoRA(nn.Module):
    """x -> alpha/rank * B(A(x)). B starts at zero, so a fresh adapter changes nothing."""

    def __init__(self, d_in: int, d_out: int, rank: int, alpha: float):
        super().__init__()
        self.A = nn.Linear(d_in, rank, bias=False)
        self.B = nn.Linear(rank, d_out, bias=False)
        nn.init.kaiming_uniform_(self.A.weight, a=5 ** 0.5)
        nn.init.zeros_(self.B.weight)
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.B(self.A(x)) * self.scale  # [..., d_in] -> [..., d_out]


class QueryConditionedRead(nn.Module):
    """(g, h) -> B(A_g(g) * A_h(h)): the gist read modulated by the reading position. B starts at zero."""

    def __init__(self, width: int, hidden: int, rank: int):
        super().__init__()
        self.from_gist = nn.Linear(width, rank, bias=False)
        self.from_query = nn.Linear(hidden, rank, bias=False)
        self.out = nn.Linear(rank, width, bias=False)
        nn.init.zeros_(self.out.weight)

    def forward(self, g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self.out(self.from_gist(g) * self.from_query(h))  # [B, T, width]


class GistAttention(nn.Module):
    """The gist branch of one upper layer. It borrows q_proj / q_norm / RoPE / scaling from the base
    attention passed to forward(), and owns only the zero-gist key, an optional gate and adapters."""

    def __init__(self, dims: ModelDims, config: GistConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = dims.n_heads, dims.n_kv_heads, dims.head_dim
        self.per_fact = config.gists_per_fact
        self.zero_key = nn.Parameter(torch.randn(dims.n_kv_heads, dims.head_dim) * config.zero_key_init_std)
        r, alpha, width = config.adapter_rank, config.adapter_alpha, dims.n_heads * dims.head_dim
        self.lora_q = LoRA(dims.hidden, width, r, alpha) if r else None
        self.lora_out = LoRA(width, width, r, alpha) if r else None
        self.gate = nn.Parameter(torch.full((dims.n_heads,), float(config.gate_init))) \
            if config.gate_init is not None else None
        self.read = QueryConditionedRead(width, dims.hidden, config.read_rank) if config.read_rank else None

    def one_gist_per_row(self, kv: torch.Tensor) -> torch.Tensor:
        """Pool rows [F, per_fact * KVH, D] (a fact's gists side by side) as gists [F * per_fact, KVH, D]."""
        return kv if self.per_fact == 1 else kv.reshape(-1, self.n_kv_heads, self.head_dim)

    def queries(self, attn: nn.Module, h: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The layer's own queries, as its self-attention makes them (+ the branch's LoRA)."""
        B, T, _ = h.shape
        q = attn.q_proj(h)  # [B, T, H*D]
        if self.lora_q is not None:
            q = q + self.lora_q(h)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        if isinstance(getattr(attn, "q_norm", None), nn.Module):
            q = attn.q_norm(q)  # Gemma3: RMSNorm over D, before RoPE, as self-attention does
        cos, sin = cos_sin
        q, _ = rope_function(attn)(q, q[:, :1], cos, sin)  # [B, H, T, D]
        return q

    def attention(self, attn: nn.Module, h: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor],
                  keys: torch.Tensor, temperature: float | torch.Tensor,
                  visible: torch.Tensor | None = None) -> torch.Tensor:
        """[B, KVH, G*T, N+1] softmax over [zero-gist, gists] at every position (column 0: the zero-gist),
        the H = KVH*G query heads grouped by the kv head they read (head h reads kv head h // G).

        Grouped, the pool's keys are read in place: expanding them to H heads and prepending the zero-gist
        copied the whole pool twice per layer and token (~0.4 ms a layer at 1,000 gists on the CPU)."""
        B, T, _ = h.shape
        KVH, G = self.n_kv_heads, self.n_heads // self.n_kv_heads
        keys = self.one_gist_per_row(keys)  # [N, KVH, D]
        q = self.queries(attn, h, cos_sin).reshape(B, KVH, G * T, self.head_dim)  # [B, KVH, G*T, D]
        zero = q @ self.zero_key.to(keys.dtype)[:, :, None]  # [B, KVH, G*T, 1]
        att = torch.cat([zero, q @ keys.permute(1, 2, 0)], dim=-1)  # [B, KVH, G*T, N+1]
        att = att * (attn.scaling / temperature)
        if visible is not None:  # the mention gate: rows a sequence may not read drop out of its softmax
            if self.per_fact > 1:  # a fact's gists are shown or hidden together
                visible = visible.repeat_interleave(self.per_fact, dim=1)  # [B, N * per_fact]
            keep = F.pad(visible, (1, 0), value=True)[:, None, None, :]  # [B, 1, 1, N+1], zero-gist always
            att = att.masked_fill(~keep, float("-inf"))
        return att.softmax(dim=-1, dtype=torch.float32).to(q.dtype)  # [B, KVH, G*T, N+1]

    def forward(self, attn: nn.Module, h: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor],
                y: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                read: torch.Tensor | None, temperature: float | torch.Tensor,
                visible: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = h.shape
        H, D = self.n_heads, self.head_dim
        att = self.attention(attn, h, cos_sin, keys, temperature, visible)  # [B, KVH, G*T, N+1]
        v = self.one_gist_per_row(values).transpose(0, 1)  # [KVH, N, D]; the zero-gist's value is zero
        g = (att[..., 1:] @ v).view(B, H, T, D)  # [B, H, T, D]
        if self.gate is not None:
            g = g * self.gate.to(g.dtype)[None, :, None, None]  # [B, H, T, D]
        g = g.transpose(1, 2).reshape(B, T, H * D)  # [B, T, H*D], head-major like self-attention
        extra = self.lora_out(g) if self.lora_out is not None else None  # [B, T, H*D]
        if self.read is not None:
            conditioned = self.read(g, h)  # [B, T, H*D]
            extra = conditioned if extra is None else extra + conditioned
        if extra is not None:
            g = g + extra
        if read is not None:
            g = g * read[..., None].to(g.dtype)  # [B, T, H*D], zero at and before a <GIST>
        return y + g  # [B, T, H*D]


class GistAddon(nn.Module):
    """All add-on parameters, and the hooks that attach them to a base model.

    >>> addon = GistAddon.for_model(model, GistConfig())
    >>> addon.attach(model, gist_token_id)          # base state dict unchanged
    >>> with addon.use(pool.view(user_id)):          # a forward / generate that reads the pool
    ...     model(input_ids)
    >>> addon.detach()                               # every hook removed
    """

    def __init__(self, config: GistConfig, dims: ModelDims):
        super().__init__()
        self.config, self.dims = config, dims
        self.layer_ids = config.layers_for(dims.n_layers)
        self.branches = nn.ModuleDict({str(i): GistAttention(dims, config) for i in self.layer_ids})
        self.gist_embedding = nn.Parameter(torch.zeros(dims.hidden))  # [C], set by init_from(model)
        if config.gists_per_fact > 1:  # the embeddings of a fact's second, third, ... gist
            self.later_gist_embeddings = nn.Parameter(torch.zeros(config.gists_per_fact - 1, dims.hidden))
        self.compress_lora = nn.ModuleDict()
        if config.adapter_rank:
            width = {"q_proj": dims.n_heads * dims.head_dim, "k_proj": dims.n_kv_heads * dims.head_dim,
                     "v_proj": dims.n_kv_heads * dims.head_dim, "o_proj": dims.hidden}
            for layer in range(dims.n_layers):
                for name in config.compress_targets:
                    d_in = dims.n_heads * dims.head_dim if name == "o_proj" else dims.hidden
                    self.compress_lora[f"{layer}_{name}"] = LoRA(d_in, width[name], config.adapter_rank,
                                                                 config.adapter_alpha)
        self.runtime = hooks.GistRuntime()
        self.gist_token_id: int | None = None
        self._handles: list = []
        self.eval()  # inference by default (temperature on); training code calls .train()

    @classmethod
    def for_model(cls, model: nn.Module, config: GistConfig | None = None) -> GistAddon:
        """A fresh add-on sized by introspection, on the model's device and dtype."""
        addon = cls(config or GistConfig(), model_dims(model))
        addon.init_from(model)
        return addon

    @torch.no_grad()
    def init_from(self, model: nn.Module) -> None:
        """Gist embedding = mean of the input embedding rows, in the embedding's output space (so a
        scaled embedding, as Gemma's, is respected); then match the model's device and dtype."""
        emb = model.get_input_embeddings()
        weight = emb.weight  # [V, C]
        probe = int(weight.norm(dim=-1).argmax())
        out = emb(torch.tensor([[probe]], device=weight.device))[0, 0]  # [C]
        scale = out.norm() / weight[probe].norm()
        self.to(device=weight.device, dtype=weight.dtype)
        self.gist_embedding.copy_(weight.mean(dim=0) * scale)  # [C]
        if self.config.gists_per_fact > 1:
            self.later_gist_embeddings.copy_(self.gist_embedding.expand_as(self.later_gist_embeddings))

    def gist_embeddings(self) -> torch.Tensor:
        """[gists_per_fact, C]: the embedding of a fact's first gist, then of each later one."""
        if self.config.gists_per_fact == 1:
            return self.gist_embedding[None]
        return torch.cat([self.gist_embedding[None], self.later_gist_embeddings])

    @property
    def pool_heads(self) -> int:
        """Key/value heads in one pool row: the model's, once per gist of the fact."""
        return self.dims.n_kv_heads * self.config.gists_per_fact

    # -- attaching --------------------------------------------------------------------------------
    def attach(self, model: nn.Module, gist_token_id: int) -> None:
        if self._handles:
            raise GistHookError("this gist add-on is already attached; detach() it first")
        dims = model_dims(model)
        if dims != self.dims:
            raise ConfigError(f"gist add-on was built for {self.dims}, the model is {dims}")
        self.gist_token_id = int(gist_token_id)
        self._handles = hooks.install(self, model)
        log.debug("gist add-on attached to layers %s (%d hooks)", self.layer_ids, len(self._handles))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.runtime.clear()

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    @contextmanager
    def use(self, view):
        """Let forwards inside read `view` (a PoolView or CompressedGists: .layers, .keys, .values
        as [L, N, KVH, D]). None, or a view with no rows, leaves the base model bit-identical."""
        if not self._handles:
            raise GistHookError("attach() the gist add-on before use()")
        previous = self.runtime.pool
        self.runtime.set_pool(view, self.layer_ids)
        try:
            yield self
        finally:
            self.runtime.pool = previous

    def temperature(self, n_gists: int | Sequence[int]) -> float | torch.Tensor:
        """T applies at inference only, once the visible pool holds more than the threshold. `n_gists` is the
        pool's size, or per sequence the rows it may read (mention gate): a query that sees only its
        subject's few gists is not sharpened as if it read the whole pool. A float when every sequence gets
        the same T, else a [B, 1, 1, 1] tensor."""
        cfg = self.config
        per_row = [n_gists] if isinstance(n_gists, int) else list(n_gists)
        temps = [cfg.temperature if (not self.training and n > cfg.temperature_min_gists) else 1.0 for n in per_row]
        if len(set(temps)) <= 1:
            return temps[0] if temps else 1.0
        return torch.tensor(temps, device=self.gist_embedding.device)[:, None, None, None]

    def fingerprint(self) -> str:
        """A short hash of the config and every weight: a pool compressed by another add-on (or by this one
        before more training) is tagged with another fingerprint, so its gists are known to be stale."""
        digest = hashlib.sha256(json.dumps(self.config.to_dict(), sort_keys=True).encode())
        for name, tensor in sorted(self.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()[:16]

    # -- saving -----------------------------------------------------------------------------------
    def save(self, directory: str | Path, extra: dict | None = None) -> Path:
        """Write the add-on weights (safetensors) and a JSON config, alone, atomically (temp dir + rename)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=directory.name + ".", dir=directory.parent))
        try:
            tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
            save_file(tensors, str(tmp / WEIGHTS_FILE))
            meta = {"format": ADDON_FORMAT, "config": self.config.to_dict(), "dims": self.dims.to_dict(),
                    "extra": extra or {}}
            (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
            replace_directory(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return directory

    @classmethod
    def load(cls, directory: str | Path, model: nn.Module | None = None) -> GistAddon:
        """Read an add-on saved by save(); with `model`, check its dims and move to its device/dtype."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(directory)
        try:
            meta = json.loads((directory / CONFIG_FILE).read_text())
            tensors = load_file(str(directory / WEIGHTS_FILE))
        except (OSError, ValueError, SafetensorError) as exc:
            raise ConfigError(f"cannot read gist add-on in {directory}: {exc}") from exc
        if meta.get("format") != ADDON_FORMAT:
            raise ConfigError(f"gist add-on format {meta.get('format')} is not {ADDON_FORMAT}")
        addon = cls(GistConfig.from_dict(meta["config"]), ModelDims(**meta["dims"]))
        if model is not None:
            if model_dims(model) != addon.dims:
                raise ConfigError(f"gist add-on in {directory} was trained for {addon.dims}, not this model")
            weight = model.get_input_embeddings().weight
            addon.to(device=weight.device, dtype=weight.dtype)
        addon.load_state_dict(tensors)
        return addon

    def grown_to(self, config: GistConfig) -> GistAddon:
        """This add-on, grown (warm start) wherever `config` asks for more adapter rank, read rank or gists per
        fact than it has; each growth keeps what it computes (see the with_* methods)."""
        addon = self
        if config.adapter_rank > addon.config.adapter_rank:
            addon = addon.with_adapter_rank(config.adapter_rank)
        if config.read_rank > addon.config.read_rank:
            addon = addon.with_read_rank(config.read_rank)
        if config.gists_per_fact > addon.config.gists_per_fact:
            addon = addon.with_gists_per_fact(config.gists_per_fact)
        if addon is not self:
            log.info("the warm start grows to adapter rank %d, read rank %d, %d gists per fact",
                     addon.config.adapter_rank, addon.config.read_rank, addon.config.gists_per_fact)
        return addon

    def with_adapter_rank(self, rank: int) -> GistAddon:
        """A copy whose LoRAs (compression pass and gist branch) have rank `rank` (a warm start that grows
        capacity): each trained adapter fills the first ranks, the new ranks start with B = 0, and alpha
        grows with the rank so that alpha / rank, the scale, stays. The copy computes what this add-on does."""
        old = self.config.adapter_rank
        if not old or rank <= old:
            raise ConfigError(f"adapter rank can only grow from {old} (> 0) to more, not to {rank}")
        alpha = self.config.adapter_alpha * rank / old
        return self._grown(replace(self.config, adapter_rank=rank, adapter_alpha=alpha))

    def with_read_rank(self, rank: int) -> GistAddon:
        """A copy with a query-conditioned read of `rank` (added, or grown from a smaller one): every trained
        weight is kept, and the new read (or its new ranks) starts at zero, so the copy computes what this
        add-on does."""
        if rank <= self.config.read_rank:
            raise ConfigError(f"the read can only grow from rank {self.config.read_rank}, not to {rank}")
        return self._grown(replace(self.config, read_rank=rank))

    @torch.no_grad()
    def with_gists_per_fact(self, count: int) -> GistAddon:
        """A copy with `count` gists per fact: the trained gists' embeddings kept, each new one's starting as a
        copy of the last trained one (a fresh vector would be far from anything trained)."""
        old = self.config.gists_per_fact
        if count <= old:
            raise ConfigError(f"gists per fact can only grow from {old}, not to {count}")
        grown = self._grown(replace(self.config, gists_per_fact=count))
        grown.later_gist_embeddings[old - 1:] = self.gist_embeddings()[-1]
        return grown

    @torch.no_grad()
    def _grown(self, config: GistConfig) -> GistAddon:
        """An add-on of `config` holding this one's weights in the leading slice of each of its tensors. What
        is new keeps its initialisation, which is zero for every output side (LoRA B, the read's `out`), so
        new ranks and modules add exactly nothing until they train."""
        grown = type(self)(config, self.dims)
        weight = self.gist_embedding
        grown.to(device=weight.device, dtype=weight.dtype)
        state = grown.state_dict()
        for key, value in self.state_dict().items():
            if key not in state or any(a > b for a, b in zip(value.shape, state[key].shape)):
                raise ConfigError(f"cannot grow this add-on: {key} {tuple(value.shape)} does not fit")
            state[key][tuple(slice(0, n) for n in value.shape)] = value
        grown.load_state_dict(state)
        grown.train(self.training)
        return grown
