"""Consistent In-Context Editing (ICE, ICLR 2025; DESIGN.md 1.1), on the live model.

Each step samples a short continuation x_c from the current model given [instruction + context, query,
target] (one per context, batched), then takes one Adam step on

    loss = -log p(x* | q) + lam * mean_c sum_t KL( p(. | [c, q, x*, x_c<t]).detach() || p(. | [q, x*, x_c<t]) )

over the full vocabulary at the sampled positions. Fixed relative to the authors' code: the instruction
prefixes are separate strings (theirs lost a comma and merged three), every sampling setting is explicit,
the teacher distribution is the raw softmax (not the temperature/top-k-processed scores) and is detached,
and the student's logits are shifted one position against the tokens they predict.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from editors.base import EditRequest
from editors.tuning import EncodedFact, StepOut, TuneConfig, TunedEditor, _is_int, _is_num, target_terms
from memory.errors import ConfigError, EditError

INSTRUCTIONS = ("", "Fact: ", "A new knowledge: ", "Consider this new knowledge: ", "Remember this fact: ",
                "Remember this new fact and reason about its consequences: ")


@dataclass(frozen=True)
class ICEConfig(TuneConfig):
    """ICE settings on top of TuneConfig. temperature 0 samples greedily; dynamic=False is the static
    ablation (x_c and its teacher distribution drawn once, from the pre-edit model)."""

    lam: float = 1.0
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    n_sample_tokens: int = 1  # the authors' 3 costs locality: later positions carry no fact (docs/ice.md)
    dynamic: bool = True
    stop_kl: float = 0.5  # mean KL per sampled position (nats) that counts as settled...
    stop_kl_delta: float = 0.1  # ...or this small a change since the previous step
    max_contexts: int = 2  # 5 measured no better on SmolLM2 and costs 2.5x the teacher pass (docs/ice.md)
    instructions: tuple[str, ...] = INSTRUCTIONS
    joiner: str = " Now: "  # between the context and the query, as the authors join them

    def __post_init__(self):
        if isinstance(self.instructions, list):
            object.__setattr__(self, "instructions", tuple(self.instructions))
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        for name in ("lam", "temperature", "stop_kl", "stop_kl_delta"):
            if not _is_num(getattr(self, name)) or getattr(self, name) < 0:
                raise ConfigError(f"{name} must be a finite number >= 0, got {getattr(self, name)!r}")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            raise ConfigError(f"top_k must be None or an integer >= 1, got {self.top_k!r}")
        if not _is_num(self.top_p) or not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p!r}")
        for name in ("n_sample_tokens", "max_contexts"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not isinstance(self.dynamic, bool):
            raise ConfigError(f"dynamic must be a bool, got {self.dynamic!r}")
        if not self.instructions or not all(isinstance(s, str) for s in self.instructions):
            raise ConfigError("instructions must be a non-empty list of strings (\"\" allowed)")
        if not isinstance(self.joiner, str):
            raise ConfigError(f"joiner must be a string, got {self.joiner!r}")

    def to_dict(self) -> dict:
        data = super().to_dict()
        data["instructions"] = list(self.instructions)
        return data


@dataclass
class ICEJob:
    """One edit's token ids and the current sampled targets."""

    fact: EncodedFact
    prefixes: list[list[torch.Tensor]]  # [context][instruction] -> ids of instruction + context + joiner + query
    xc: torch.Tensor | None = None  # [k, n] sampled continuation tokens
    teacher_logp: torch.Tensor | None = field(default=None, repr=False)  # [k, n, V] with-context log-probs
    mask: torch.Tensor | None = None  # [k, n] 1 up to and including a sampled EOS


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float) -> torch.Tensor:
    """Top-k then nucleus filtering (the order transformers uses), as -inf on dropped tokens."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # [k, 1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # [k, V]
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(-1) - probs >= top_p  # keep the smallest prefix with mass >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), -math.inf)
    return logits


def sample_next(logits: torch.Tensor, cfg: ICEConfig, generator: torch.Generator) -> torch.Tensor:
    """One token per row from [k, V] logits with the configured temperature, top-k and top-p."""
    if cfg.temperature == 0:
        return logits.argmax(-1)
    filtered = filter_logits(logits.float() / cfg.temperature, cfg.top_k, cfg.top_p)
    return torch.multinomial(torch.softmax(filtered, dim=-1), 1, generator=generator)[:, 0]  # [k]


class ICEEditor(TunedEditor):
    name: ClassVar[str] = "ice"
    config_class: ClassVar[type] = ICEConfig

    def _prepare(self, request: EditRequest, fact: EncodedFact) -> ICEJob:
        cfg = self.config
        # Without contexts the authors fall back to the fact itself as one statement.
        contexts = [c.strip() for c in request.contexts if c.strip()][: cfg.max_contexts]
        contexts = contexts or [f"{request.prompt.strip()} {request.target.strip()}."]
        prefixes = [[torch.tensor(self.tokenizer(f"{ins}{ctx}{cfg.joiner}{request.prompt}")["input_ids"],
                                  device=self.device) for ins in cfg.instructions] for ctx in contexts]
        return ICEJob(fact=fact, prefixes=prefixes)

    @torch.no_grad()
    def _sample(self, job: ICEJob, generator: torch.Generator) -> None:
        """Sample x_c from the current model given [c, q, x*] for every context in one left-padded
        batch with a KV cache, keeping the raw with-context distribution at each sampled position."""
        cfg = self.config
        picks = torch.randint(len(cfg.instructions), (len(job.prefixes),), generator=generator, device=self.device)
        rows = [torch.cat([job.prefixes[j][int(i)], job.fact.target_ids]) for j, i in enumerate(picks)]
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((len(rows), width), pad, dtype=torch.long, device=self.device)  # [k, L]
        attn = torch.zeros_like(ids)  # [k, L]
        for j, row in enumerate(rows):
            ids[j, width - len(row):] = row
            attn[j, width - len(row):] = 1
        positions = (attn.cumsum(-1) - 1).clamp(min=0)  # [k, L] real positions under left padding
        out = self.model(input_ids=ids, attention_mask=attn, position_ids=positions, use_cache=True,
                         logits_to_keep=1)
        tokens, logps = [], []
        for t in range(cfg.n_sample_tokens):
            logits = out.logits[:, -1].float()  # [k, V]
            if not torch.isfinite(logits).all():
                raise EditError(f"non-finite logits while sampling at token {t}")
            logps.append(torch.log_softmax(logits, dim=-1))
            tokens.append(sample_next(logits, cfg, generator))
            if t + 1 == cfg.n_sample_tokens:
                break
            attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)  # [k, L+t+1]
            positions = positions[:, -1:] + 1  # [k, 1]
            out = self.model(input_ids=tokens[-1][:, None], attention_mask=attn, position_ids=positions,
                             cache=out.cache, use_cache=True)
        job.xc = torch.stack(tokens, dim=1)  # [k, n]
        job.teacher_logp = torch.stack(logps, dim=1)  # [k, n, V]
        eos = self.tokenizer.eos_token_id
        after_eos = (job.xc == eos).long().cumsum(1) - (job.xc == eos).long() if eos is not None else None
        job.mask = (torch.ones_like(job.xc) if after_eos is None else (after_eos == 0).long()).float()  # [k, n]

    def _objective(self, job: ICEJob, step: int, generator: torch.Generator) -> StepOut:
        cfg = self.config
        if cfg.dynamic or job.xc is None:
            self._sample(job, generator)
        k, n = job.xc.shape
        n_target = len(job.fact.target_ids)
        shared = torch.cat([job.fact.prompt_ids, job.fact.target_ids])  # [Lq+Lx]
        ids = torch.cat([shared.expand(k, -1), job.xc[:, :-1]], dim=1)  # [k, Lq+Lx+n-1]
        # Identical rows (always so when n == 1: the only KL position ends [q, x*]) run once.
        rows, inverse = torch.unique(ids, dim=0, return_inverse=True)  # [u, Lq+Lx+n-1], [k]
        logits = self.model(input_ids=rows, use_cache=False, logits_to_keep=n_target + n).logits  # [u, Lx+n, V]
        # Every row shares [q, x*], so the target term is read from row 0 only.
        nll, nll_mean, learned = target_terms(logits[0, :n_target], job.fact.target_ids)
        student = torch.log_softmax(logits[:, n_target:].float(), dim=-1)[inverse]  # [k, n, V]
        teacher_p = job.teacher_logp.exp()  # [k, n, V]
        kl_terms = torch.where(teacher_p > 0, teacher_p * (job.teacher_logp - student), 0.0)  # [k, n, V]
        kl_pos = kl_terms.sum(-1) * job.mask  # [k, n]
        loss = nll + cfg.lam * kl_pos.sum(1).mean()
        kl_mean = float(kl_pos.detach().sum() / job.mask.sum().clamp(min=1))
        return StepOut(loss=loss, nll=nll_mean, learned=learned, kl=kl_mean)

    def _converged(self, out: StepOut, history: list[dict]) -> bool:
        if not super()._converged(out, history):
            return False
        prev = history[-2]["kl"] if len(history) > 1 else None
        settled = out.kl <= self.config.stop_kl or (prev is not None and abs(out.kl - prev) <= self.config.stop_kl_delta)
        return settled
