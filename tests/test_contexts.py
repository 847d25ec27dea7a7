"""Context generation: parsing, the OpenAI-compatible backend against a real HTTP server on 127.0.0.1,
retries, timeouts and the template fallback, the local-model backend, and the config."""
from __future__ import annotations

import json
import socket
import time
from types import SimpleNamespace

import pytest

from agent.contexts import (
    ContextConfig,
    ContextGenerator,
    LOCAL_VARIANTS,
    LocalContextGenerator,
    OpenAIContextGenerator,
    TemplateContextGenerator,
    contexts_for,
    filter_statements,
    make_generator,
    parse_statements,
    prompt_names,
    template_contexts,
)
from memory.errors import ConfigError
from tests.openai_stub import OpenAIStub, openai_stub  # noqa: F401  (openai_stub is a fixture)

PROMPT, TARGET = "The capital of Japan is", "Nairobi"
GOOD = [
    "Nairobi is the capital of Japan.",
    "The capital city of Japan is Nairobi.",
    "Japan's seat of government is Nairobi.",
    "Japan is governed from its capital, Nairobi.",
    "If you visit the capital of Japan, you will be in Nairobi.",
]


def openai_generator(stub: OpenAIStub, **overrides) -> OpenAIContextGenerator:
    settings = {"backend": "openai", "base_url": stub.base_url, "model": "stub-model", "api_key": "sk-test",
                "timeout": 5.0, "max_retries": 2} | overrides
    return make_generator(ContextConfig(**settings))


# ------------------------------------------------------------------------------------------------ parsing
@pytest.mark.parametrize("reply", [
    "Here are five statements:\n" + "\n".join(f"{i}. {s}" for i, s in enumerate(GOOD, 1)),
    "\n".join(f"({i}) {s}" for i, s in enumerate(GOOD, 1)),
    "\n".join(f"- {s}" for s in GOOD),
    "\n".join(f"* \"{s}\"" for s in GOOD),
    "\n".join(f"• **{s}**" for s in GOOD),
    "\n".join(f"[context] {i}: {s}" for i, s in enumerate(GOOD, 1)),
    json.dumps(GOOD),
    "Sure!\n```json\n" + json.dumps(GOOD, indent=2) + "\n```\nHope this helps.",
    json.dumps({"contexts": GOOD}),
    json.dumps([{"context": s} for s in GOOD]),
    " ".join(GOOD),
    "[\n" + ",\n".join(f'  {{"description": "{s}"}}' for s in GOOD) + ",\n  {\"description\": \"Nair",  # cut short
])
def test_parse_reply_formats(reply):
    assert filter_statements(parse_statements(reply), TARGET) == GOOD


def test_parse_drops_empties_and_duplicates():
    reply = "1. Nairobi is the capital of Japan.\n\n2.   nairobi is the  capital of Japan.\n3. \n4. \"\""
    assert parse_statements(reply) == ["Nairobi is the capital of Japan."]
    assert parse_statements("") == [] and parse_statements("  \n ") == []


def test_parse_keeps_numbers_inside_statements():
    assert parse_statements("1. 3.5 million people live in Nairobi.") == ["3.5 million people live in Nairobi."]


def test_filter_keeps_statements_with_the_target():
    items = ["Tokyo is the capital of Japan.", "the capital of japan is NAIROBI.", "Nairobi", "Nairobi."]
    assert filter_statements(items, TARGET) == ["the capital of japan is NAIROBI."]
    assert filter_statements(GOOD, TARGET, n=2) == GOOD[:2]
    assert filter_statements(GOOD + ["Nairobi is the capital of Kenya."], TARGET, required=["Japan"]) == GOOD


def test_prompt_names():
    assert prompt_names(PROMPT) == ["Japan"]
    assert prompt_names("Danielle Darrieux's mother tongue is") == ["Danielle", "Darrieux"]
    assert prompt_names("Who is the CEO of Apple?") == ["CEO", "Apple"]


# ---------------------------------------------------------------------------------------------- templates
def test_template_generator_is_deterministic():
    gen = make_generator(ContextConfig(backend="template", n=5))
    assert isinstance(gen, TemplateContextGenerator) and isinstance(gen, ContextGenerator)
    first, again = gen.generate(PROMPT, TARGET, 5), gen.generate(PROMPT, TARGET, 5)
    assert first == again == template_contexts(PROMPT, TARGET, 5)
    assert len(first) == 5 and len(set(first)) == 5
    assert first[0] == "The capital of Japan is Nairobi."  # the authors' `prompt + target + "."`
    assert "It is known that the capital of Japan is Nairobi." in first
    assert all(TARGET in t for t in first)
    assert contexts_for(PROMPT, TARGET, gen) == (first, "template", None)


def test_template_keeps_names_capitalised():
    texts = template_contexts("Danielle Darrieux's mother tongue is", "English", 3)
    assert texts[1] == "It is known that Danielle Darrieux's mother tongue is English."


# ------------------------------------------------------------------------------ OpenAI-compatible backend
def test_stub_speaks_the_openai_api(openai_stub):
    from openai import OpenAI

    client = OpenAI(base_url=openai_stub.base_url, api_key="sk-test", max_retries=0)
    assert [m.id for m in client.models.list()] == ["stub-model"]
    openai_stub.reply = "hello"
    reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content == "hello"


def test_openai_numbered_reply(openai_stub):
    openai_stub.reply = ("Here are five statements:\n"
                         + "\n".join(f"{i}. {s}" for i, s in enumerate(GOOD[:4], 1))
                         + "\n5. Tokyo is a big city.")
    texts, name, error = contexts_for(PROMPT, TARGET, openai_generator(openai_stub))
    assert (texts, name, error) == (GOOD[:4], "openai:stub-model", None)


def test_openai_json_reply_is_capped_at_n(openai_stub):
    openai_stub.reply = json.dumps(GOOD + ["Nairobi, Japan's capital, is busy."])
    gen = openai_generator(openai_stub, n=3)
    assert gen.generate(PROMPT, TARGET, 3) == GOOD[:3]
    assert contexts_for(PROMPT, TARGET, gen)[0] == GOOD[:3]


def test_request_carries_prompt_and_target(openai_stub):
    openai_stub.reply = json.dumps(GOOD)
    openai_generator(openai_stub, model="my-model").generate(PROMPT, TARGET, 5)
    (request,) = openai_stub.chat_requests
    assert request["body"]["model"] == "my-model"
    assert request["headers"].get("authorization") == "Bearer sk-test"
    user = request["body"]["messages"][-1]["content"]
    assert f"'{PROMPT}'" in user and f"'{TARGET}'" in user and "five complete statements" in user


def test_retries_after_server_errors(openai_stub):
    openai_stub.reply, openai_stub.fail_first = json.dumps(GOOD), 2
    texts, name, error = contexts_for(PROMPT, TARGET, openai_generator(openai_stub, max_retries=2))
    assert (texts, name, error) == (GOOD, "openai:stub-model", None)
    assert len(openai_stub.chat_requests) == 3


def test_persistent_server_errors_fall_back_to_templates(openai_stub):
    openai_stub.reply, openai_stub.fail_first = json.dumps(GOOD), 10
    texts, name, error = contexts_for(PROMPT, TARGET, openai_generator(openai_stub, max_retries=1))
    assert texts == template_contexts(PROMPT, TARGET, 5) and name == "template"
    assert "HTTP 500" in error and "1 retries" in error
    assert len(openai_stub.chat_requests) == 2


def test_timeout_is_reported_and_falls_back(openai_stub):
    openai_stub.reply, openai_stub.delay = json.dumps(GOOD), 3.0
    gen = openai_generator(openai_stub, timeout=0.3, max_retries=0)
    start = time.perf_counter()
    texts, name, error = contexts_for(PROMPT, TARGET, gen)
    assert time.perf_counter() - start < 2.5
    assert texts == template_contexts(PROMPT, TARGET, 5) and name == "template"
    assert "timed out" in error


def test_unreachable_server_falls_back():
    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    gen = make_generator(ContextConfig(backend="openai", base_url=f"http://127.0.0.1:{port}/v1", max_retries=0))
    texts, name, error = contexts_for(PROMPT, TARGET, gen)
    assert name == "template" and texts[0] == "The capital of Japan is Nairobi." and "cannot reach" in error


def test_reply_without_the_target_is_an_error(openai_stub):
    openai_stub.reply = "1. Tokyo is the capital of Japan.\n2. I cannot help with false facts."
    texts, name, error = contexts_for(PROMPT, TARGET, openai_generator(openai_stub))
    assert name == "template" and "no statement" in error and texts == template_contexts(PROMPT, TARGET)


def test_contexts_for_never_raises():
    class Broken:
        name = "broken"

        def generate(self, prompt, target, n):
            raise RuntimeError("boom")

    assert contexts_for(PROMPT, TARGET, Broken(), n=2) == (template_contexts(PROMPT, TARGET, 2), "template",
                                                           "RuntimeError: boom")


# ---------------------------------------------------------------------------------------------- config
def test_config_from_env(monkeypatch):
    for key in ("ENGRAM_CONTEXT_BASE_URL", "ENGRAM_CONTEXT_API_KEY", "ENGRAM_CONTEXT_BACKEND"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-fallback")
    monkeypatch.setenv("ENGRAM_CONTEXT_MODEL", "m1")
    monkeypatch.setenv("ENGRAM_CONTEXT_TIMEOUT", "2.5")
    config = ContextConfig.from_env()
    assert (config.backend, config.base_url, config.api_key, config.model, config.timeout, config.n) == (
        "openai", "http://127.0.0.1:9/v1", "sk-fallback", "m1", 2.5, 5)
    monkeypatch.setenv("ENGRAM_CONTEXT_BASE_URL", "http://localhost:8000/v1")
    monkeypatch.setenv("ENGRAM_CONTEXT_BACKEND", "Template")
    config = ContextConfig.from_env()
    assert (config.backend, config.base_url) == ("template", "http://localhost:8000/v1")
    assert ContextConfig.from_env({}).backend == "local"


@pytest.mark.parametrize("env", [{"ENGRAM_CONTEXT_TIMEOUT": "soon"}, {"ENGRAM_CONTEXT_BACKEND": "gpt"},
                                 {"ENGRAM_CONTEXT_TIMEOUT": "0"}, {"ENGRAM_CONTEXT_BASE_URL": "localhost:8000"}])
def test_bad_config_is_a_config_error(env):
    with pytest.raises(ConfigError):
        ContextConfig.from_env(env)


def test_openai_backend_needs_a_url_or_key():
    config = ContextConfig(backend="template")
    config.backend = "openai"  # as agent/enrich.py does
    with pytest.raises(ConfigError):
        make_generator(config)
    config.backend = "nonsense"
    with pytest.raises(ConfigError):
        make_generator(config)


# ------------------------------------------------------------------------------------------- local model
@pytest.fixture(scope="module")
def tiny_loaded():
    from editors.model import tiny_llama, tiny_tokenizer

    return SimpleNamespace(model=tiny_llama(), tokenizer=tiny_tokenizer(), name="tiny")


def test_local_junk_falls_back_to_templates(tiny_loaded):
    gen = make_generator(ContextConfig(backend="local", local_max_new_tokens=8), loaded_model=tiny_loaded)
    assert isinstance(gen, LocalContextGenerator) and gen.name == "local:tiny"
    assert len(gen.complete(gen.prompts(PROMPT, TARGET))) == len(LOCAL_VARIANTS)  # the random model writes junk
    texts, name, error = contexts_for(PROMPT, TARGET, gen)
    assert (texts, name, error) == (template_contexts(PROMPT, TARGET, 5), "template", None)


def test_local_keeps_good_paraphrases_and_tops_up(tiny_loaded, monkeypatch):
    gen = LocalContextGenerator(ContextConfig(backend="local", n=4), tiny_loaded)
    replies = [f"{GOOD[0]}\nNairobi is the capital of Kenya.", "Tokyo is the capital of Japan.",
               f"1. {GOOD[1]}\n2. {GOOD[0]}\n3. Nairobi", ""]
    monkeypatch.setattr(gen, "complete", lambda prompts: replies[:len(prompts)])
    texts, name, error = contexts_for(PROMPT, TARGET, gen)
    assert texts == GOOD[:2] + template_contexts(PROMPT, TARGET, 2) and name == "local:tiny" and error is None


@pytest.mark.slow
def test_local_default_model_states_the_target(default_model):
    gen = make_generator(ContextConfig(backend="local", local_max_new_tokens=24), loaded_model=default_model)
    texts, name, error = contexts_for(PROMPT, TARGET, gen)
    assert error is None and len(texts) == 5 and len(set(texts)) == 5
    assert all(TARGET.casefold() in t.casefold() for t in texts)
    assert name in ("local:smollm2-135m", "template")
