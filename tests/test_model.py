"""Model loading: the tiny config-built Llama for unit tests, and the real default model offline."""
from __future__ import annotations

import json

import pytest
import torch

from editors.answer import generate_greedy
from editors.model import load_model, resolve_device, tiny_llama, tiny_tokenizer


def test_tiny_llama_is_deterministic():
    a, b = tiny_llama(seed=0), tiny_llama(seed=0)
    ids = torch.tensor([tiny_tokenizer()("The capital of Japan is")["input_ids"]])
    assert torch.equal(a(ids).logits, b(ids).logits)
    assert not torch.equal(a(ids).logits, tiny_llama(seed=1)(ids).logits)


def test_tiny_tokenizer_round_trips():
    tok = tiny_tokenizer()
    text = "Nairobi is the capital of Japan."
    assert tok.decode(tok(text)["input_ids"]) == text
    assert max(tok(text)["input_ids"]) < 128


def test_resolve_device_cpu():
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        assert resolve_device("auto").type == "cpu"


def test_unknown_model_is_a_clear_error(tmp_path):
    from memory.errors import ModelLoadError

    with pytest.raises(ModelLoadError):
        load_model(str(tmp_path / "no-such-model"), "cpu")


@pytest.mark.slow
def test_default_model_answers_paris(default_model):
    assert default_model.model.config.num_hidden_layers == 30
    answer = generate_greedy(default_model.model, default_model.tokenizer, ["The capital of France is"], max_new_tokens=4)
    assert "Paris" in answer[0]


@pytest.mark.slow
def test_corrupt_cache_is_rebuilt(tmp_path, monkeypatch):
    from editors import model as model_module

    monkeypatch.setenv("ENGRAM_CACHE", str(tmp_path))
    first = load_model("smollm2-135m", "cpu")
    cache = model_module.cache_root() / "models" / "smollm2-135m"
    # Unlink first: the loaded model still maps the old file, and writing into that inode would
    # pull the pages from under it (SIGBUS). A new file is what a real corruption would look like.
    (cache / "model.safetensors").unlink()
    (cache / "model.safetensors").write_bytes(b"garbage")
    second = load_model("smollm2-135m", "cpu")
    assert not second.from_cache
    assert torch.equal(first.model.model.embed_tokens.weight, second.model.model.embed_tokens.weight)
    assert json.loads((cache / "engram-cache.json").read_text())["gguf"].endswith(".gguf")


def test_processes_that_start_together_convert_the_cache_once(tmp_path):
    """Two loaders racing on a fresh cache: one converts, the other waits and finds it done."""
    import threading
    import time as _time

    from editors.model import ensure_cache

    cache_dir, fingerprint = tmp_path / "models" / "tiny", {"size": 1}
    calls, results = [], []

    def convert():
        calls.append(1)
        _time.sleep(0.5)  # long enough that the second thread arrives while the first converts
        return tiny_llama(), tiny_tokenizer()

    threads = [threading.Thread(target=lambda: results.append(ensure_cache(cache_dir, fingerprint, convert)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and sorted(results) == [False, True]
    assert json.loads((cache_dir / "engram-cache.json").read_text()) == fingerprint
    assert ensure_cache(cache_dir, fingerprint, convert, rebuild=True) and len(calls) == 2


@pytest.mark.slow
def test_two_threads_loading_the_default_model_at_once_get_identical_weights():
    import threading

    from editors.fingerprint import model_fingerprint
    from editors.model import load_model

    loaded, errors = [], []

    def load():
        try:
            loaded.append(load_model("smollm2-135m", "cpu"))
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=load) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(loaded) == 2
    a, b = (model_fingerprint(m.model, "smollm2-135m") for m in loaded)
    assert a == b  # without the load lock, one copy came out with newly initialised embeddings
