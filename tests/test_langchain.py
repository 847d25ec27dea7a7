"""LangChain over Engram: the standard `langchain_tests` suites, and a few checks of our own.

- ChatModelUnitTests for ChatEngram (no server);
- ChatModelIntegrationTests against a real uvicorn server (tests/test_server.py's app, engine and tiny
  model), and again in process over the same ChatEngine; tool calling, structured output, JSON mode and
  non-text inputs are switched off by the suites' own properties (Engram has none of them);
- RetrieversIntegrationTests for EngramRetriever over a temp store, ranked with the hash embedder.

The tiny model's words are noise, so nothing checks them: the checks compare Engram with itself and check
shapes, counts and metadata. Tokens that decode to nothing are suppressed in the tiny model, so a "the
answer is not empty" check never depends on its floats.
"""
from __future__ import annotations

import pytest
from langchain_core.messages import AIMessageChunk, HumanMessage, ToolMessage
from langchain_tests.integration_tests import ChatModelIntegrationTests, RetrieversIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from agent.adapters import ChatEngram, EngramRetriever
from memory.embeddings import HashEmbedder
from memory.facts import FactInput
from memory.store import FactStore
from tests.test_server import KEY, engine, url  # noqa: F401  (module fixtures: the tiny engine, served)

SERVED: dict = {}  # what the suites' properties read (properties cannot take fixtures)


@pytest.fixture(scope="module")
def served(engine, url):  # noqa: F811
    model = engine.model
    model.generation_config.suppress_tokens = [i for i in range(model.config.vocab_size)
                                               if engine.tokenizer.decode([i], skip_special_tokens=True) == ""]
    SERVED.update(engine=engine, base_url=f"{url}/v1")
    yield SERVED
    SERVED.clear()


class _Switches:
    """What Engram's chat models do not have, said through the suites' properties."""

    @property
    def chat_model_class(self) -> type[ChatEngram]:
        return ChatEngram

    @property
    def has_tool_calling(self) -> bool:
        return False

    @property
    def has_tool_choice(self) -> bool:
        return False

    @property
    def has_structured_output(self) -> bool:
        return False

    @property
    def supports_json_mode(self) -> bool:
        return False

    @property
    def supports_image_inputs(self) -> bool:
        return False

    @property
    def supports_image_urls(self) -> bool:
        return False

    @property
    def supports_pdf_inputs(self) -> bool:
        return False

    @property
    def supports_audio_inputs(self) -> bool:
        return False

    @property
    def supports_video_inputs(self) -> bool:
        return False

    @property
    def supports_image_tool_message(self) -> bool:
        return False

    @property
    def supports_pdf_tool_message(self) -> bool:
        return False

    @property
    def supports_anthropic_inputs(self) -> bool:
        return False

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    @property
    def model_override_value(self) -> str:
        return "base"  # another route of the same server: the answer's model_name must say it


class TestChatEngramUnit(_Switches, ChatModelUnitTests):
    @property
    def chat_model_params(self) -> dict:
        return {"base_url": "http://127.0.0.1:9/v1", "model": "engram"}  # never called: no server needed

    @property
    def init_from_env_params(self) -> tuple[dict, dict, dict]:
        return ({"ENGRAM_API_KEY": "sk-env", "ENGRAM_BASE_URL": "http://127.0.0.1:9/v1"}, {},
                {"api_key": "sk-env", "base_url": "http://127.0.0.1:9/v1"})


class TestChatEngramOverHTTP(_Switches, ChatModelIntegrationTests):
    @pytest.fixture(autouse=True)
    def _serve(self, served):
        pass

    @property
    def chat_model_params(self) -> dict:
        return {"base_url": SERVED["base_url"], "api_key": KEY, "model": "engram", "max_tokens": 8,
                "temperature": 0, "max_retries": 0, "timeout": 30}


class TestChatEngramInProcess(_Switches, ChatModelIntegrationTests):
    @pytest.fixture(autouse=True)
    def _serve(self, served):
        pass

    @property
    def chat_model_params(self) -> dict:
        return {"engine": SERVED["engine"], "model": "engram", "max_tokens": 8, "temperature": 0}


FACTS = [FactInput(prompt="The capital of France is", target="Paris", subject="France", relation="capital"),
         FactInput(prompt="The capital of Japan is", target="Nairobi", subject="Japan", relation="capital"),
         FactInput(prompt="The capital of Peru is", target="Oslo", subject="Peru", relation="capital"),
         FactInput(text="Mount Fuji is the tallest mountain in Japan.", subject="Mount Fuji"),
         FactInput(prompt="The capital of Kenya is", target="Lima", subject="Kenya", relation="capital", scope="user",
                   user_id="alice")]


@pytest.fixture(scope="module")
def fact_store(tmp_path_factory):
    store = FactStore(f"sqlite:///{tmp_path_factory.mktemp('retriever') / 'store.sqlite'}")
    store.add_facts(FACTS)
    SERVED["store"] = store
    yield store
    store.engine.dispose()


class TestEngramRetriever(RetrieversIntegrationTests):
    @pytest.fixture(autouse=True)
    def _store(self, fact_store):
        pass

    @property
    def retriever_constructor(self) -> type[EngramRetriever]:
        return EngramRetriever

    @property
    def retriever_constructor_params(self) -> dict:
        return {"store": SERVED["store"], "embedder": HashEmbedder(), "k": 2}

    @property
    def retriever_query_example(self) -> str:
        return "What is the capital of Japan?"


# -- our own checks -----------------------------------------------------------------------------------
def test_http_and_in_process_answer_alike_with_engram_metadata(served):
    over_http = ChatEngram(base_url=served["base_url"], api_key=KEY, max_tokens=6, temperature=0)
    in_process = ChatEngram(engine=served["engine"], max_tokens=6, temperature=0)
    ask = [HumanMessage("What is the capital of Japan?")]
    remote, local = over_http.invoke(ask), in_process.invoke(ask)
    assert remote.content == local.content  # greedy: the same engine answers both
    for answer in (remote, local):
        meta = answer.response_metadata
        assert meta["model_name"] == "engram" and meta["finish_reason"] in ("stop", "length")
        assert meta["engram"]["model_version"] == served["engine"].model_version
        assert meta["engram"]["route"] == "engram" and meta["engram"]["provenance"]["weights"] == "edited"
        assert 0 < answer.usage_metadata["output_tokens"] <= 6
    assert remote.usage_metadata == local.usage_metadata


def test_a_stream_joins_to_the_plain_answer_and_ends_with_the_marked_last_chunk(served):
    chat = ChatEngram(base_url=served["base_url"], api_key=KEY, model="rag", max_tokens=6, temperature=0,
                      user="bob")
    chunks = list(chat.stream("What is the capital of Japan?"))
    *body, last = chunks
    assert all(isinstance(c, AIMessageChunk) and c.usage_metadata is None for c in body)
    assert last.chunk_position == "last" and last.content == "" and last.usage_metadata["input_tokens"] > 0
    full = sum(chunks[1:], chunks[0])
    assert full.content == chat.invoke("What is the capital of Japan?").content
    hits = full.response_metadata["engram"]["provenance"]["rag_hits"]
    assert full.response_metadata["model_name"] == "rag" and len(hits) == 1  # bob sees the global fact only


def test_n_choices_and_per_call_overrides(served):
    chat = ChatEngram(engine=served["engine"], max_tokens=4, temperature=1.0, seed=3, n=2)
    result = chat.generate([[HumanMessage("Hello")]])
    assert len(result.generations[0]) == 2
    base = chat.invoke("Hello", model="base", n=1, temperature=0)
    assert base.response_metadata["engram"]["provenance"]["weights"] == "base"
    with pytest.raises(ValueError, match="n=1"):
        list(chat.stream("Hello"))


@pytest.mark.parametrize("chat_kwargs", [{"engine": True}, {"base_url": True}])
def test_what_engram_cannot_honour_is_refused(served, chat_kwargs):
    where = {k: served["engine"] if k == "engine" else served["base_url"] for k in chat_kwargs}
    chat = ChatEngram(api_key=KEY, max_tokens=2, **where)
    image = HumanMessage(content=[{"type": "text", "text": "what is this?"},
                                  {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}])
    with pytest.raises(ValueError, match="text only"):
        chat.invoke([image])
    with pytest.raises(ValueError, match="no tool calling"):
        chat.invoke([HumanMessage("hi"), ToolMessage("3", tool_call_id="c1")])
    with pytest.raises(ValueError, match="cannot honour"):
        chat.invoke("hi", logprobs=True)


def test_a_missing_endpoint_is_one_clear_error():
    with pytest.raises(ValueError, match="base_url"):
        ChatEngram(base_url=None).invoke("hi")


def test_the_retriever_scopes_by_user_and_says_what_each_fact_is(fact_store):
    bob = EngramRetriever(store=fact_store, embedder=HashEmbedder(), k=10)
    assert len(bob.invoke("capital")) == 4  # every global fact, never alice's
    alice = bob.invoke("What is the capital of Kenya?", user="alice", k=5)
    assert len(alice) == 5
    kenya = next(d for d in alice if d.metadata["subject"] == "Kenya")
    assert kenya.page_content == "The capital of Kenya is Lima"
    assert kenya.metadata["scope"] == "user" and kenya.metadata["user"] == "alice"
    assert kenya.metadata["relation"] == "capital" and kenya.id == str(kenya.metadata["fact_id"])
    fuji = next(d for d in bob.invoke("tallest mountain", k=4) if d.metadata["subject"] == "Mount Fuji")
    assert fuji.page_content == "Mount Fuji is the tallest mountain in Japan."


def test_the_retriever_opens_a_store_by_url_and_sees_new_facts(fact_store):
    retriever = EngramRetriever(store=fact_store.url, embedder=HashEmbedder(), k=1)
    (first,) = retriever.invoke("France Paris")
    assert first.metadata["subject"] == "France"
    (added,) = fact_store.add_facts([FactInput(prompt="The capital of Chile is", target="Rome",
                                               subject="Chile")]).new_ids
    try:
        assert retriever.invoke("Chile capital Rome")[0].metadata["fact_id"] == added
    finally:
        fact_store.delete_fact(added)
    assert all(d.metadata["fact_id"] != added for d in retriever.invoke("Chile capital Rome", k=4))
