"""A shared prompt prefix run once must give what the full prompts give on their own."""
import pytest
import torch

from editors import prefix_cache
from editors.answer import generate_greedy
from editors.model import tiny_llama, tiny_tokenizer
from evaluation import metrics

FACTS = "Facts:\n- the sky is green\n- the sea is red\n- grass is blue\n\n"
QUERIES = ["The sky is", "Sea:", "What colour is grass? It is", "x"]
TARGETS = ["green", "red!", "blue", "yz"]


@pytest.fixture(scope="module")
def tiny():
    model = tiny_llama(seed=3).eval()
    return model, tiny_tokenizer()


def _unshared(monkeypatch):
    monkeypatch.setattr(prefix_cache, "MIN_SHARED_TOKENS", 10 ** 9)


def test_common_prefix_length():
    assert prefix_cache.common_prefix_length([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert prefix_cache.common_prefix_length([[5, 1], [1]]) == 0
    assert prefix_cache.common_prefix_length([]) == 0


def test_shared_prefix_is_used_and_matches_full_prompts(tiny, monkeypatch):
    model, tok = tiny
    prompts = [FACTS + q for q in QUERIES]
    calls = []
    real = prefix_cache.SharedPrefix.__init__

    def spy(self, m, ids):
        calls.append(len(ids))
        real(self, m, ids)

    monkeypatch.setattr(prefix_cache.SharedPrefix, "__init__", spy)
    shared_argmax = metrics.argmax_tokens(model, tok, prompts, TARGETS, batch_size=3)
    shared_text = generate_greedy(model, tok, prompts, max_new_tokens=6, batch_size=3, stop_at_newline=False)
    assert calls and all(n >= prefix_cache.MIN_SHARED_TOKENS for n in calls)  # the shared path really ran
    _unshared(monkeypatch)
    assert metrics.argmax_tokens(model, tok, prompts, TARGETS, batch_size=3) == shared_argmax
    assert generate_greedy(model, tok, prompts, max_new_tokens=6, batch_size=3, stop_at_newline=False) == shared_text


def test_shared_prefix_logits_match(tiny):
    model, tok = tiny
    ids = [list(tok(FACTS + q)["input_ids"]) for q in QUERIES[:2]]
    prefix = prefix_cache.shared_prefix_for(model, ids, max_length=10 ** 6)
    assert prefix is not None and prefix.length == prefix_cache.common_prefix_length(ids)
    suffix = torch.tensor([ids[0][prefix.length:]])
    with torch.no_grad():
        cached = prefix.forward(suffix, torch.ones_like(suffix)).logits[0]
        full = model(input_ids=torch.tensor([ids[0]])).logits[0, prefix.length:]
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-4)


def test_short_prefixes_are_not_shared(tiny):
    model, tok = tiny
    ids = [list(tok(q)["input_ids"]) for q in QUERIES]
    assert prefix_cache.shared_prefix_for(model, ids, max_length=100) is None


def test_reused_prefixes_extend_by_the_new_tokens_only(tiny, monkeypatch):
    model, tok = tiny
    lines = [f"- fact number {i} is {chr(97 + i)}\n" for i in range(6)]
    runs = []
    real = prefix_cache.SharedPrefix._run
    monkeypatch.setattr(prefix_cache.SharedPrefix, "_run", lambda self, new, kv: runs.append(len(new)) or real(self, new, kv))
    with prefix_cache.reuse_prefixes():
        results = []
        for n in (4, 5, 6, 6):  # the facts block grows by one line, then stays
            prompts = ["Facts:\n" + "".join(lines[:n]) + "\n" + q for q in QUERIES]
            results.append(metrics.argmax_tokens(model, tok, prompts, TARGETS, batch_size=3))
    assert runs[1] < runs[0] and runs[1] <= len(lines[4]) + 2  # the second block only ran its new line
    assert runs[3:] == []  # the same block again: nothing to run
    monkeypatch.setattr(prefix_cache, "MIN_SHARED_TOKENS", 10 ** 9)
    for n, got in zip((4, 5, 6, 6), results):
        prompts = ["Facts:\n" + "".join(lines[:n]) + "\n" + q for q in QUERIES]
        assert metrics.argmax_tokens(model, tok, prompts, TARGETS, batch_size=3) == got
    assert prefix_cache._Reuse.last is None  # forgotten outside the context


def test_a_single_prompt_reuses_the_previous_prefix(tiny, monkeypatch):
    model, tok = tiny
    block = "Facts:\n" + "".join(f"- fact number {i} is {chr(97 + i)}\n" for i in range(5)) + "\n"
    runs = []
    real = prefix_cache.SharedPrefix._run
    monkeypatch.setattr(prefix_cache.SharedPrefix, "_run", lambda self, new, kv: runs.append(len(new)) or real(self, new, kv))
    with prefix_cache.reuse_prefixes():
        metrics.argmax_tokens(model, tok, [block + q for q in QUERIES], TARGETS)  # the block runs once
        single = metrics.argmax_tokens(model, tok, [block + QUERIES[0]], TARGETS[:1])
        text = generate_greedy(model, tok, [block + QUERIES[1]], max_new_tokens=4, stop_at_newline=False)
    assert len(runs) == 3 and max(runs[1:]) < 20  # later calls ran only their own query's tokens
    monkeypatch.setattr(prefix_cache, "MIN_SHARED_TOKENS", 10 ** 9)
    assert metrics.argmax_tokens(model, tok, [block + QUERIES[0]], TARGETS[:1]) == single
    assert generate_greedy(model, tok, [block + QUERIES[1]], max_new_tokens=4, stop_at_newline=False) == text
