"""Short, stable fingerprints of a base model and of a gist add-on directory.

A store's weight deltas and gists only make sense on the model (and add-on) that produced them; the store
records these fingerprints (FactStore.bind_fingerprint) and refuses another model instead of silently
applying deltas to the wrong weights.

The model fingerprint hashes the config (minus volatile keys), every parameter's name, shape and dtype,
and a fixed small sample of the weights that weight editors never change: the input/output embeddings
and the 1-D tensors (norms, biases). Why not every weight: ICE/FT-M edit MLP projections in place, and the
live, edited model must keep its base model's fingerprint. The shapes still cover every tensor.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from memory.errors import ModelLoadError, NotFoundError

DIGEST_CHARS = 16
SAMPLE = 4096  # values sampled from each embedding matrix
SMALL_SAMPLE = 256  # values sampled from each 1-D tensor
CHUNK = 1 << 20
# Config keys that change with the library version, the load path or runtime flags, not with the model.
VOLATILE_KEYS = {"transformers_version", "use_cache", "return_dict", "output_attentions",
                 "output_hidden_states", "torchscript"}


def _stable_config(value: object) -> object:
    """The config without private (`_name_or_path`, `_attn_implementation`, ...) or volatile keys."""
    if isinstance(value, dict):
        return {k: _stable_config(v) for k, v in value.items()
                if not str(k).startswith("_") and k not in VOLATILE_KEYS}
    if isinstance(value, (list, tuple)):
        return [_stable_config(v) for v in value]
    return value


def _sample(tensor: torch.Tensor, n: int) -> bytes:
    """`n` evenly spaced values, as int64 micro-units: the same on CPU and GPU for the same weights."""
    flat = tensor.detach().reshape(-1)
    steps = min(n, flat.numel())
    if steps == 0:
        return b""
    # Integer index arithmetic: float linspace rounds differently on other devices for huge tensors.
    idx = torch.arange(steps, dtype=torch.int64) * (flat.numel() - 1) // max(steps - 1, 1)
    values = flat.index_select(0, idx.to(flat.device)).to("cpu", torch.float64)
    return torch.round(values * 1e6).to(torch.int64).numpy().tobytes()


def model_fingerprint(model: torch.nn.Module, name: str) -> str:
    """A 16-hex-digit digest of `model`'s config and base weights. `name` only labels errors: the same
    weights under a hub id or a local path get the same fingerprint."""
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        raw = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
        digest.update(json.dumps(_stable_config(raw), sort_keys=True, default=str).encode())
    digest.update(type(model).__name__.encode())
    try:
        embeddings = [model.get_input_embeddings(), model.get_output_embeddings()]
    except (AttributeError, NotImplementedError) as exc:
        raise ModelLoadError(f"cannot fingerprint model {name}: it has no input embeddings") from exc
    sampled = {id(m.weight) for m in embeddings if m is not None and getattr(m, "weight", None) is not None}
    if not sampled:
        raise ModelLoadError(f"cannot fingerprint model {name}: it has no input embeddings")
    with torch.no_grad():
        for pname, param in sorted(model.named_parameters(), key=lambda item: item[0]):
            digest.update(f"{pname}:{tuple(param.shape)}:{param.dtype};".encode())
            if id(param) in sampled:
                digest.update(_sample(param, SAMPLE))
            elif param.dim() <= 1:
                digest.update(_sample(param, SMALL_SAMPLE))
    return digest.hexdigest()[:DIGEST_CHARS]


def addon_fingerprint(path: str | Path) -> str:
    """A 16-hex-digit digest of an add-on directory (or file): sorted relative names, sizes and bytes,
    read in chunks so a large weights file is never held in memory."""
    root = Path(path)
    if not root.exists():
        raise NotFoundError(f"no gist add-on at {root}")
    files = [root] if root.is_file() else sorted((p for p in root.rglob("*") if p.is_file()),
                                                 key=lambda p: p.relative_to(root).as_posix())
    digest = hashlib.sha256()
    for file in files:
        rel = file.name if file == root else file.relative_to(root).as_posix()
        # Name and size first, so moving bytes from one file to the next changes the digest.
        digest.update(rel.encode() + b"\0" + file.stat().st_size.to_bytes(8, "little"))
        with file.open("rb") as handle:
            while chunk := handle.read(CHUNK):
                digest.update(chunk)
    return digest.hexdigest()[:DIGEST_CHARS]
