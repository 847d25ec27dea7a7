"""GistConfig: every setting of the InComeS gist add-on, typed and self-validating.

The config describes the add-on only (which layers read the pool, the selection temperature, the
adapter sizes). The model's own dimensions are found by introspection (`introspect.model_dims`) and
saved next to the add-on weights, so a saved add-on can refuse a model it was not trained for.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from memory.errors import ConfigError

# Linear layers of each attention module that may carry a compression-pass LoRA. These are the
# attribute names every supported architecture (Llama, Qwen2, Gemma3, Mistral, ...) gives its
# attention projections; the injector checks they exist and are nn.Linear.
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class GistConfig:
    """Settings of the gist cross-attention add-on (DESIGN §1.2).

    gist_token: the special token appended to each fact; its K/V in the upper layers is the gist.
    upper_layers: layer indices that compress and read the pool; None = `n_layers // 2 .. n_layers-1`.
    temperature: at inference the gist logits are divided by it, once the visible pool holds more
        than `temperature_min_gists` gists (the paper's T = 0.45 above 10 gists). Never in training.
    adapter_rank: LoRA rank of the adapters that act only in the compression pass (on every layer's
        `compress_targets`) and in the gist branch (query and output); 0 = no adapters.
    adapter_alpha: LoRA scale numerator (the update is alpha / rank * B A x).
    compress_targets: attention projections that get a compression-pass LoRA.
    zero_key_init_std: std of the learnable zero-gist keys at init (0 = zeros).
    gate_init: None = no gate; else a learnable per-head gate on the gist output, starting here.
    read_rank: rank of the query-conditioned read (0 = off). One gist's read is otherwise the same vector at
        every position, scaled per head; this adds `B(A_g(g) * A_h(h))` (g the read, h the reading
        position's hidden state), so a gist can give each position of a multi-token answer its own token.
        It lives in the gist branch only: no memory per fact, and an empty pool still skips the branch.
    gists_per_fact: how many <GIST> tokens follow each fact (each with its own learned embedding); every one
        is a key/value the branch can select, so a multi-token answer can take its tokens from different
        gists. Memory per fact grows with it.
    """

    gist_token: str = "<GIST>"
    upper_layers: tuple[int, ...] | None = None
    temperature: float = 0.45
    temperature_min_gists: int = 10
    adapter_rank: int = 0
    adapter_alpha: float = 16.0
    compress_targets: tuple[str, ...] = ATTENTION_PROJECTIONS
    zero_key_init_std: float = 0.0
    gate_init: float | None = None
    read_rank: int = 0
    gists_per_fact: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.gist_token, str) or not self.gist_token.strip():
            raise ConfigError("gist_token must be a non-empty string")
        if self.upper_layers is not None:
            layers = tuple(self.upper_layers)
            if not layers or any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in layers):
                raise ConfigError(f"upper_layers must be non-negative ints, got {self.upper_layers!r}")
            if len(set(layers)) != len(layers):
                raise ConfigError(f"upper_layers has duplicates: {layers}")
            object.__setattr__(self, "upper_layers", tuple(sorted(layers)))
        _check_number("temperature", self.temperature, low=0.0, inclusive=False)
        _check_int("temperature_min_gists", self.temperature_min_gists, low=0)
        _check_int("adapter_rank", self.adapter_rank, low=0)
        _check_int("read_rank", self.read_rank, low=0)
        _check_int("gists_per_fact", self.gists_per_fact, low=1)
        _check_number("adapter_alpha", self.adapter_alpha, low=0.0, inclusive=False)
        _check_number("zero_key_init_std", self.zero_key_init_std, low=0.0)
        if self.gate_init is not None:
            _check_number("gate_init", self.gate_init)
        targets = tuple(self.compress_targets)
        unknown = sorted(set(targets) - set(ATTENTION_PROJECTIONS))
        if unknown:
            raise ConfigError(f"compress_targets {unknown} are not among {ATTENTION_PROJECTIONS}")
        object.__setattr__(self, "compress_targets", targets)

    def layers_for(self, n_layers: int) -> tuple[int, ...]:
        """The upper layers of a model with `n_layers` decoder layers."""
        if self.upper_layers is None:
            return tuple(range(n_layers // 2, n_layers))
        bad = [i for i in self.upper_layers if i >= n_layers]
        if bad:
            raise ConfigError(f"upper_layers {bad} do not exist in a model with {n_layers} layers")
        return self.upper_layers

    def to_dict(self) -> dict:
        out = asdict(self)
        out["upper_layers"] = list(self.upper_layers) if self.upper_layers is not None else None
        out["compress_targets"] = list(self.compress_targets)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> GistConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown GistConfig keys: {unknown}")
        data = dict(data)
        if data.get("upper_layers") is not None:
            data["upper_layers"] = tuple(data["upper_layers"])
        if "compress_targets" in data:
            data["compress_targets"] = tuple(data["compress_targets"])
        return cls(**data)


def _check_number(name: str, value, low: float | None = None, inclusive: bool = True) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if low is not None and (value < low or (not inclusive and value == low)):
        raise ConfigError(f"{name} must be {'>=' if inclusive else '>'} {low}, got {value}")


def _check_int(name: str, value, low: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an int, got {value!r}")
    if low is not None and value < low:
        raise ConfigError(f"{name} must be >= {low}, got {value}")
