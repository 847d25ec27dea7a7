"""`engram bench --sections chat` on a tiny config-built model: the JSON's shape and that every figure is a
positive number. These are no speed goals; the real figures come from the bench on the default model."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from agent.chat.bench import HOW, ChatBenchConfig, bench_chat
from agent.chat.engine import ROUTES
from editors.incomes import GistAddon, GistConfig
from editors.model import tiny_llama, tiny_tokenizer
from memory.embeddings import HashEmbedder

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
FIGURES = ("chat_ttft_ms", "chat_tokens_per_second", "chat_latency_ms")
TINY = ChatBenchConfig(facts=4, repeats=2, max_tokens=6)


def tiny_loaded():
    model = tiny_llama()
    # the character-level tokenizer makes RAG's and ICL's prompts long: room past tiny_llama's 256 positions
    model.config.max_position_embeddings = 1024
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = TEMPLATE
    return SimpleNamespace(model=model, tokenizer=tokenizer, name="tiny")


def run(loaded, cfg: ChatBenchConfig = TINY) -> dict:
    return bench_chat(loaded, cfg, addon=GistAddon.for_model(loaded.model, GistConfig()), embedder=HashEmbedder())


def check_figures(out: dict, routes, max_tokens: int) -> None:
    assert "unavailable" not in out
    for route in routes:
        for figure in FIGURES:
            value = out[f"{figure}_{route}"]
            assert isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0, (figure, route, value)
        assert out[f"chat_completion_tokens_{route}"] == max_tokens  # EOS held back: the full length decoded
        assert out[f"chat_prompt_tokens_{route}"] > 0 and out[f"chat_prepare_ms_{route}"] >= 0
        assert out[f"chat_latency_ms_{route}"] >= out[f"chat_ttft_ms_{route}"]


def test_every_route_gets_positive_figures_in_the_sections_shape():
    loaded = tiny_loaded()
    out = run(loaded)
    json.dumps(out)  # it goes into the bench's JSON as it is
    assert out["measured"] == HOW and "ChatEngine" in HOW and "not over HTTP" in HOW
    assert out["model"] == "tiny" and out["device"] == "cpu"
    assert out["decoding"] == "greedy" and out["max_tokens"] == 6 and out["repeats"] == 2
    assert out["facts"] == 4 and out["pool_facts"] == 4  # the gist pool holds the store's facts
    assert out["routes"] == list(ROUTES)
    check_figures(out, ROUTES, 6)
    assert loaded.model.generation_config.min_new_tokens is None  # the model is left as it was


def test_an_answer_that_would_end_at_once_still_decodes_max_tokens():
    loaded = tiny_loaded()
    eos = loaded.tokenizer.eos_token_id

    def prefer_eos(module, inputs, logits):  # greedy picks EOS first, every step, unless it is held back
        logits[..., eos] += 1e4
        return logits

    loaded.model.lm_head.register_forward_hook(prefer_eos)
    out = run(loaded, ChatBenchConfig(facts=2, repeats=1, max_tokens=5, routes=("base", "rag")))
    check_figures(out, ("base", "rag"), 5)
    assert "chat_ttft_ms_engram" not in out


def test_engram_bench_sections_chat_writes_the_figures(tmp_path, monkeypatch, capsys):
    from agent.cli import main
    from editors.incomes import memory as gist_memory
    from memory import vector

    model = tiny_llama()
    model.config.max_position_embeddings = 1024
    model.save_pretrained(tmp_path / "model")
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(tmp_path / "model")
    monkeypatch.setattr(vector, "default_embedder", HashEmbedder)  # no MiniLM in a unit test
    monkeypatch.setattr(gist_memory, "default_addon_dir", lambda name: None)  # an untrained add-on
    out_path = tmp_path / "bench.json"
    code = main(["bench", "--sections", "chat", "--model", str(tmp_path / "model"), "--device", "cpu",
                 "--out", str(out_path), "--chat-facts", "3", "--chat-max-tokens", "4", "--quick", "--json"])
    assert code == 0
    results = json.loads(out_path.read_text())
    assert json.loads(capsys.readouterr().out)["chat"] == results["chat"]
    chat = results["chat"]
    assert chat["repeats"] == 1 and chat["facts"] == 3 and chat["gist_addon"].startswith("untrained")
    assert chat["bench_seconds"] >= 0 and {"model", "machine", "memory"} <= set(results)
    check_figures(chat, ROUTES, 4)


@pytest.mark.parametrize("flags, repeats", [([], 3), (["--quick"], 1), (["--quick", "--chat-repeats", "2"], 2)])
def test_repeats_default_to_three_and_quick_takes_fewer(monkeypatch, flags, repeats):
    from agent.cli import parse_args
    from agent.commands import bench

    seen = {}

    def fake(loaded, cfg):
        seen["cfg"] = cfg
        return {}

    monkeypatch.setattr("agent.chat.bench.bench_chat", fake)
    bench.bench_chat(parse_args(["bench", "--sections", "chat", *flags]), None)
    assert seen["cfg"].repeats == repeats and seen["cfg"].facts == 100 and seen["cfg"].max_tokens == 32


def test_the_scale_section_reads_one_row_of_a_large_pool_and_reports_both_speeds(monkeypatch):
    from editors.incomes import bench as gist_bench

    loaded = tiny_loaded()
    monkeypatch.setattr(gist_bench, "default_addon_dir", lambda name: None)  # an untrained add-on: speed only
    reads = []
    original = gist_bench.GistMemory.reading

    def recording(self, user_id=None, read=None):
        reads.append(read if read is not None else set())
        return original(self, user_id, reads[-1])

    monkeypatch.setattr(gist_bench.GistMemory, "reading", recording)
    out = gist_bench.decode_at_scale(loaded, 300, tokens=3, repeats=1)
    assert out["facts"] == 301
    assert out["base_decode_ms_per_token"] > 0 and out["gist_decode_ms_per_token"] > 0
    assert out["gist_vs_base_ratio"] == round(out["gist_decode_ms_per_token"] / out["base_decode_ms_per_token"], 3)
    assert reads == [{0}]  # the gate let the query read the one fact it names, none of the 300 others
    assert out["gist_append_ms_per_fact_empty"] > 0 and out["gist_append_ms_per_fact_full"] > 0


def test_the_headline_figures_take_their_names_from_the_sections():
    from evaluation.bench_figures import headline

    results = {"edits": {"ice": {"median_seconds_per_edit": 4.0}, "ftm": {"median_seconds_per_edit": 2.0}},
               "scale": {"facts": 100_001, "base_decode_ms_per_token": 20.0, "gist_decode_ms_per_token": 22.0,
                         "gist_vs_base_ratio": 1.1, "gist_append_ms_per_fact_empty": 30.0,
                         "gist_append_ms_per_fact_full": 33.0},
               "rag": {"facts": 100_000, "end_to_end_p50_ms": 12.5}, "startup": {"edits": 1000, "startup_seconds": 2.5},
               "memory": {"peak_rss_mib": 900.0}}
    figures = headline(results)
    assert figures == {"ice_seconds_per_edit": 4.0, "ftm_seconds_per_edit": 2.0, "ice_vs_ftm_time_ratio": 2.0,
                       "base_decode_ms_per_token": 20.0, "gist_decode_ms_per_token_100k": 22.0,
                       "gist_vs_base_decode_ratio_100k": 1.1, "gist_append_ms_per_fact_empty": 30.0,
                       "gist_append_ms_per_fact_at_100k": 33.0, "rag_query_ms_100k": 12.5,
                       "startup_seconds_1000_edits": 2.5, "peak_rss_mb": 900.0}
    assert headline({}) == {}  # sections that did not run give no figures
