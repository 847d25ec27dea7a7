"""What ICE and FT-M share: the config fields, target encoding, the L-inf box and the tuning loop.

Both editors run Adam on a few MLP output projections, clip the gradient norm, clamp every trained
weight into a box around its pre-edit value after each step, and stop once the target is learned.
They differ only in the loss of one step (`TunedEditor._objective`).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, fields
from typing import ClassVar

import torch

from editors.base import EditRequest, EditResult, apply_delta, finalize_delta, restore, snapshot
from editors.constraints import UpdateConstraints
from editors.layers import target_parameters
from memory.errors import ConfigError, EditError

log = logging.getLogger(__name__)

BOX_MODES = ("absolute", "relative")
CONSTRAINTS = ("box", "nullspace", "covariance")
UPDATE_KEYS = ("all", "subject")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_num(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class TuneConfig:
    """Settings shared by the gradient editors. `norm_constraint` is the L-inf box radius: in weight
    units when box_mode is "absolute", in units of each matrix's weight std when "relative"."""

    lr: float = 1e-2  # the box era's 7e-4 cannot move a rank-1, null-space update far enough (docs/ice.md)
    max_steps: int = 50  # a rank-1 update needs more steps on hard facts (wiki_counterfact train: docs/ice.md)
    layers: tuple[int, ...] | None = None  # None: the introspected early window (editors.layers)
    norm_constraint: float | None = None  # the box: 0.011 relative (~2e-3 on SmolLM2-135M) in editors.registry.BOX
    box_mode: str = "relative"
    grad_clip: float | None = 1.0
    early_stop: bool = True
    stop_nll: float = 0.1  # mean NLL per target token (nats) below which the target counts as learned
    seed: int = 0
    # "nullspace": every update is also projected off the keys of general text and of earlier edits
    # (editors/nullspace.py), so outputs on them stay put; "box": the box alone; "covariance": general text's keys weigh the update
    # (ROME's C^-1 k) and only the earlier edits' keys are kept exactly (editors/covariance.py)
    constraint: str = "nullspace"
    nullspace_energy: float = 0.03  # the free directions hold at most this share of general text's key energy
    covariance_ridge: float = 0.1  # "covariance": C + ridge * mean eigenvalue before it is inverted
    grow_preserved: bool = True  # each applied edit's keys join the preserved set
    # "subject": an update may act only through the key at the subject's last prompt token (ROME's locus; the
    # null-space part of it under "nullspace"), so prompts about other subjects keep their outputs
    update_keys: str = "subject"
    stats_texts: int = 256  # general-text samples (64 tokens each) the preserved keys are collected over
    # weight of the KL to the pre-edit model on prompts written from the fact (editors/preservation.py)
    preserve_lam: float = 0.0
    preserve_prompts: int = 2  # of each kind: the relation of other subjects, other relations of the subject

    def __post_init__(self):
        if isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))
        self.validate()

    def validate(self) -> None:
        _positive(self, "lr")
        if not _is_int(self.max_steps) or self.max_steps < 1:
            raise ConfigError(f"max_steps must be an integer >= 1, got {self.max_steps!r}")
        if self.layers is not None and (not self.layers or not all(_is_int(i) and i >= 0 for i in self.layers)
                                        or len(set(self.layers)) != len(self.layers)):
            raise ConfigError(f"layers must be distinct non-negative integers, got {self.layers!r}")
        if self.norm_constraint is not None:
            _positive(self, "norm_constraint")
        if self.box_mode not in BOX_MODES:
            raise ConfigError(f"box_mode must be one of {BOX_MODES}, got {self.box_mode!r}")
        if self.grad_clip is not None:
            _positive(self, "grad_clip")
        if not isinstance(self.early_stop, bool):
            raise ConfigError(f"early_stop must be a bool, got {self.early_stop!r}")
        if not _is_num(self.stop_nll) or self.stop_nll < 0:
            raise ConfigError(f"stop_nll must be a number >= 0, got {self.stop_nll!r}")
        if not _is_int(self.seed):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")
        if self.constraint not in CONSTRAINTS:
            raise ConfigError(f"constraint must be one of {CONSTRAINTS}, got {self.constraint!r}")
        if not _is_num(self.nullspace_energy) or not 0 < self.nullspace_energy < 1:
            raise ConfigError(f"nullspace_energy must be in (0, 1), got {self.nullspace_energy!r}")
        if not _is_num(self.covariance_ridge) or self.covariance_ridge <= 0:
            raise ConfigError(f"covariance_ridge must be a number > 0, got {self.covariance_ridge!r}")
        if not _is_num(self.preserve_lam) or self.preserve_lam < 0:
            raise ConfigError(f"preserve_lam must be a finite number >= 0, got {self.preserve_lam!r}")
        if not _is_int(self.preserve_prompts) or self.preserve_prompts < 1:
            raise ConfigError(f"preserve_prompts must be an integer >= 1, got {self.preserve_prompts!r}")
        if self.update_keys not in UPDATE_KEYS:
            raise ConfigError(f"update_keys must be one of {UPDATE_KEYS}, got {self.update_keys!r}")
        if not _is_int(self.stats_texts) or self.stats_texts < 1:
            raise ConfigError(f"stats_texts must be an integer >= 1, got {self.stats_texts!r}")
        if not isinstance(self.grow_preserved, bool):
            raise ConfigError(f"grow_preserved must be a bool, got {self.grow_preserved!r}")

    def to_dict(self) -> dict:
        data = asdict(self)
        data["layers"] = None if self.layers is None else list(self.layers)
        return data

    @classmethod
    def from_dict(cls, data: dict):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} settings: {unknown}")
        return cls(**data)


def _positive(config, name: str) -> None:
    value = getattr(config, name)
    if not _is_num(value) or value <= 0:
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")


@dataclass
class EncodedFact:
    """Token ids of one fact. The target is tokenised on its own (with its leading space), so the
    same target ids follow the bare prompt and every context-prefixed prompt."""

    prompt_ids: torch.Tensor  # [Lq]
    target_ids: torch.Tensor  # [Lx]


def encode_fact(tokenizer, prompt: str, target: str, device: torch.device) -> EncodedFact:
    if not prompt.strip() or not target.strip():
        raise EditError("an edit needs a non-empty prompt and target")
    prompt_ids = tokenizer(prompt)["input_ids"]
    target_ids = tokenizer(" " + target.strip(), add_special_tokens=False)["input_ids"]
    return EncodedFact(torch.tensor(prompt_ids, device=device), torch.tensor(target_ids, device=device))


@dataclass
class StepOut:
    """One step's loss (with its graph) and the numbers early stopping looks at."""

    loss: torch.Tensor
    nll: float  # mean NLL per target token
    learned: bool  # teacher-forced argmax equals every target token, i.e. greedy decoding yields it
    kl: float | None = None  # mean KL per sampled position (ICE only)


def target_terms(logits: torch.Tensor, target_ids: torch.Tensor) -> tuple[torch.Tensor, float, bool]:
    """Summed NLL of the target, its per-token mean, and the greedy check, from the logits at the
    positions that predict each target token."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # [Lx, V]
    nll = -logp.gather(-1, target_ids[:, None]).sum()
    learned = bool((logits.argmax(-1) == target_ids).all())
    return nll, float(nll.detach()) / len(target_ids), learned


class TunedEditor(UpdateConstraints):
    """The edit loop of both gradient editors; subclasses give `_objective` for one step."""

    name: ClassVar[str] = "tuned"
    config_class: ClassVar[type] = TuneConfig

    def __init__(self, model: torch.nn.Module, tokenizer, config: TuneConfig | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config if config is not None else self.config_class()
        if not isinstance(self.config, self.config_class):
            raise ConfigError(f"{type(self).__name__} needs a {self.config_class.__name__}")
        self._param_names = target_parameters(model, self.config.layers)
        self.device = next(model.parameters()).device
        self.n_edits = 0
        self._undo: tuple[dict, dict] | None = None  # (delta, weights before) of the last edit
        self._preserved = None  # editors.nullspace.Preserved, built on the first constrained edit
        self._last_keys_id = None  # the preserved-set entry of the last edit (rollback takes it out)

    # --- the protocol -------------------------------------------------------------------------------
    def parameter_names(self) -> list[str]:
        """The weight matrices an edit may touch (the MLP output projections of the window)."""
        return list(self._param_names)

    def edit(self, request: EditRequest) -> EditResult:
        """Tune the live model toward the fact; on NaN/Inf or any error leave it unchanged."""
        start = time.perf_counter()
        before = snapshot(self.model, self._param_names)
        history: list[dict] = []
        flags = {n: p.requires_grad for n, p in self.model.named_parameters()}
        try:
            self._tune(request, before, history)
        except Exception as exc:  # the reason goes into the result; the model is rolled back
            restore(self.model, before)
            log.warning("%s edit of %r failed: %s", self.name, request.prompt, exc)
            return EditResult(steps=_steps(history), loss=_last(history, "loss"), seconds=time.perf_counter() - start,
                              delta={}, ok=False, error=f"{type(exc).__name__}: {exc}", history=history)
        except BaseException:
            restore(self.model, before)
            raise
        finally:
            for n, p in self.model.named_parameters():
                p.requires_grad_(flags[n])
                p.grad = None
        delta = finalize_delta(self.model, before)
        self._undo = (delta, before)
        self.n_edits += 1
        if self.grows_preserved:
            self._last_keys_id = request.fact_id if request.fact_id is not None else ("edit", self.n_edits)
            self._preserved.add(self._last_keys_id, self._keys_of(request))
        return EditResult(steps=_steps(history), loss=_last(history, "loss"), seconds=time.perf_counter() - start,
                          delta=delta, history=history)

    def rollback(self, delta: dict[str, torch.Tensor]) -> None:
        """Undo an edit. The last edit is restored bit for bit from its snapshot; an older one is
        subtracted, which float rounding may leave a ulp off (the store layer replays instead)."""
        if self._undo is not None and _same_delta(self._undo[0], delta):
            restore(self.model, self._undo[1])
            self._undo = None
            if self._preserved is not None and self._last_keys_id is not None:
                self._preserved.keep_only(set(self._preserved.edit_keys) - {self._last_keys_id})
        else:
            apply_delta(self.model, delta, sign=-1.0)
        self.n_edits = max(0, self.n_edits - 1)

    def state_dict(self) -> dict:
        return {"name": self.name, "config": self.config.to_dict(), "n_edits": self.n_edits}

    def load_state_dict(self, state: dict) -> None:
        if state.get("name") != self.name:
            raise ConfigError(f"state is for editor {state.get('name')!r}, not {self.name!r}")
        self.config = self.config_class.from_dict(state["config"])
        self._param_names = target_parameters(self.model, self.config.layers)
        self.n_edits = int(state.get("n_edits", 0))

    # --- the loop ---------------------------------------------------------------------------------------
    def _tune(self, request: EditRequest, before: dict[str, torch.Tensor], history: list[dict]) -> None:
        cfg = self.config
        params = dict(self.model.named_parameters())
        for n, p in params.items():
            p.requires_grad_(n in before)
        trained = [params[n] for n in self._param_names]
        radii = box_radii(before, cfg)
        optimizer = torch.optim.Adam(trained, lr=cfg.lr, weight_decay=0.0)
        fact = encode_fact(self.tokenizer, request.prompt, request.target, self.device)
        job = self._prepare(request, fact)
        generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        space = self._preserved_set() if cfg.constraint != "box" else None
        directions = self._subject_directions(request, space) if cfg.update_keys == "subject" else None
        keep = self._preservation(request) if cfg.preserve_lam > 0 else None
        for step in range(cfg.max_steps + 1):
            with torch.set_grad_enabled(step < cfg.max_steps):  # the last pass only measures
                out = self._objective(job, step, generator)
                keep_kl = None
                if keep is not None:
                    from editors.preservation import kl_term

                    term = kl_term(self.model, keep)
                    out.loss, keep_kl = out.loss + cfg.preserve_lam * term, float(term.detach())
            if not torch.isfinite(out.loss):
                raise EditError(f"non-finite loss at step {step}")
            history.append({"step": step, "loss": float(out.loss.detach()), "nll": out.nll, "kl": out.kl,
                            "keep_kl": keep_kl, "learned": out.learned})
            if step == cfg.max_steps or (cfg.early_stop and self._converged(out, history)):
                break
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(trained, cfg.grad_clip)
            optimizer.step()
            self._clamp(params, before, radii)
            if directions is not None or space is not None:
                self._project(params, before, directions, space)

    def _clamp(self, params: dict, before: dict[str, torch.Tensor], radii: dict[str, float] | None) -> None:
        """Project into the L-inf box around the pre-edit weights, and refuse non-finite weights."""
        with torch.no_grad():
            for name, old in before.items():
                weight = params[name]
                if radii is not None:
                    weight.copy_(torch.clamp(weight, old - radii[name], old + radii[name]))
                if not torch.isfinite(weight).all():
                    raise EditError(f"non-finite weights in {name}")

    def _converged(self, out: StepOut, history: list[dict]) -> bool:
        return out.learned and out.nll <= self.config.stop_nll

    def _prepare(self, request: EditRequest, fact: EncodedFact):
        return fact

    def _objective(self, job, step: int, generator: torch.Generator) -> StepOut:
        raise NotImplementedError


def box_radii(before: dict[str, torch.Tensor], cfg: TuneConfig) -> dict[str, float] | None:
    """The box radius per trained matrix; "relative" scales it by the matrix's std, so layers whose
    weights are spread wider may move further (an absolute box treats them all alike)."""
    if cfg.norm_constraint is None:
        return None
    if cfg.box_mode == "absolute":
        return {name: cfg.norm_constraint for name in before}
    return {name: cfg.norm_constraint * float(w.float().std()) for name, w in before.items()}


def _same_delta(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a is b or (a.keys() == b.keys() and all(torch.equal(a[k], b[k].to(a[k].device)) for k in a))


def _steps(history: list[dict]) -> int:
    """Updates applied: every recorded pass but the last one stepped the optimiser."""
    return max(0, len(history) - 1)


def _last(history: list[dict], key: str) -> float:
    return history[-1][key] if history else float("nan")
