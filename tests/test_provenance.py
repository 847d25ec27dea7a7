"""An answer's pool provenance is the rows its forwards read (GistRuntime.reads), not the prompt's estimate.

Tiny models throughout: the gist gate's two-fact memory (tests/test_gist_gate.py) for the recorder, and a
tiny chat engine over a store with a global and a user-scoped fact, served by uvicorn, for the answers.
Nothing depends on the tiny models' exact output: which rows are read is decided by the gates, on token ids.
"""
from __future__ import annotations

import json

import openai
import pytest
import torch

from agent.chat import SamplingParams
from agent.server import create_app
from agent.server.app import provenance_header
from editors.incomes import GistAddon, GistConfig
from editors.incomes.memory import GistMemory
from editors.model import tiny_llama, tiny_tokenizer
from editors.prefix_cache import cache_kwarg, cache_of
from memory.embeddings import HashEmbedder
from tests.test_gist_gate import FACTS, SUBJECTS
from tests.test_gist_gate import memory as gated_memory
from tests.test_server import KEY, raw_stream, scoped_pool_engine, serving

BOTH = [{"role": "user", "content": "Is the capital of Japan or of Peru bigger?"}]
JAPAN = [{"role": "user", "content": "What is the capital of Japan?"}]


def read_by(mem: GistMemory, text: str, user: str | None = None) -> set:
    read: set = set()
    ids = mem.tokenizer(text, return_tensors="pt")["input_ids"]
    with mem.reading(user, read):
        mem.model(ids)
    return read


@pytest.fixture(scope="module")
def gated():
    mem = gated_memory()  # fact 1: Zorbia, fact 2: Vantor; the mention gate, no relation gate
    yield mem
    mem.close()


def test_a_prompt_reads_the_rows_of_the_subjects_it_names_and_no_others(gated):
    assert read_by(gated, "The capital of Zorbia is") == {1}
    assert read_by(gated, "Where does the Vantor flow?") == {2}
    assert read_by(gated, "Zorbia or Vantor?") == {1, 2}
    assert read_by(gated, "The capital of Blargland is") == set()
    assert gated.addon.runtime.reads is None  # recording ends with the reading


def test_a_subject_named_while_decoding_is_read_from_then_on(gated):
    model, tok = gated.model, gated.tokenizer
    prompt = tok("Tell me of", return_tensors="pt")["input_ids"]
    read: set = set()
    with gated.reading(read=read):
        cache = cache_of(model(prompt, use_cache=True))
        seen = []  # the rows (indices in the view) read so far, after each decoding step
        for token in tok(" Vantor", add_special_tokens=False)["input_ids"]:
            model(torch.tensor([[token]]), use_cache=True, **{cache_kwarg(model): cache})
            seen.append(set(gated.addon.runtime.reads))
    assert seen[:-1] == [set()] * (len(seen) - 1) and seen[-1] == {1}  # once the last letter is fed
    assert read == {2}  # row 1 is fact 2's


def test_a_nested_reading_records_for_itself_and_the_outer_one_resumes(gated):
    ids = lambda text: gated.tokenizer(text, return_tensors="pt")["input_ids"]  # noqa: E731
    outer, inner = set(), set()
    with gated.reading(read=outer):
        gated.model(ids("The capital of Zorbia is"))
        with gated.reading(read=inner):
            gated.model(ids("Where does the Vantor flow?"))
        with gated.reading():  # not recording: its forwards count for no one
            gated.model(ids("Where does the Vantor flow?"))
        gated.model(ids("The capital of Zorbia is"))
    assert outer == {1} and inner == {2}


def test_without_anchors_every_row_is_read_and_compressing_reads_none():
    mem = gated_memory(gate=False)
    try:
        assert read_by(mem, "The capital of Blargland is") == {1, 2}
        read: set = set()
        with mem.reading(read=read):
            mem.add([3], ["Zorbia has a third fact."])  # a compression pass inside the reading
        assert read == set() and len(mem) == 3
    finally:
        mem.close()


def test_a_row_hidden_once_its_answer_is_written_still_counts_as_read():
    mem = gated_memory()
    mem.set_answers({1: "Quellton", 2: "the Mizz"})
    model, tok = mem.model, mem.tokenizer
    prompt = tok("The capital of Zorbia is", return_tensors="pt")["input_ids"]
    *first, last = tok(" Quellton", add_special_tokens=False)["input_ids"]
    read, last_step = set(), set()
    try:
        with mem.reading(read=read):  # the answer written after the prompt, one decoding step a token
            cache = cache_of(model(prompt, use_cache=True))
            for token in first:
                model(torch.tensor([[token]]), use_cache=True, **{cache_kwarg(model): cache})
            with mem.reading(read=last_step):  # the step that feeds the answer's last token
                model(torch.tensor([[last]]), use_cache=True, **{cache_kwarg(model): cache})
                visible = mem.addon.runtime.visible_dense()
                hidden = visible is not None and not bool(visible[0, 0])
    finally:
        mem.close()
    assert hidden and last_step == set()  # that step no longer reads the row ...
    assert read == {1}  # ... which the steps before it read


def test_another_users_scoped_row_is_never_read():
    model = tiny_llama(seed=1).eval()
    mem = GistMemory(model, tiny_tokenizer(), GistAddon.for_model(model, GistConfig()))
    try:  # alice's row first: bob's view holds the global row at index 0, where the pool holds alice's
        mem.add([2, 1], FACTS[::-1], scopes=["alice", None], subjects=SUBJECTS[::-1])
        text = "Zorbia or Vantor?"
        assert read_by(mem, text, "bob") == read_by(mem, text) == {1}
        assert read_by(mem, text, "alice") == {1, 2}
    finally:
        mem.close()


def test_the_header_lists_ids_cut_after_32_and_keeps_only_header_safe_characters():
    provenance = {"pool": {"rows_read": list(range(40)), "rows_mentioned": [3]}, "weight_edits": ["a b\u00e9", 7],
                  "rag_hits": [{"fact_id": 5, "score": 0.5}]}
    read = ",".join(map(str, range(32))) + ",+8"
    known = "pool_mentioned=3; rag=5; icl=; weight_edits=ab,7"
    assert provenance_header(provenance, answered=True) == f"pool={read}; {known}"
    assert provenance_header(provenance, answered=False) == known
    assert provenance_header({"pool": None}, answered=True) == "pool=; pool_mentioned=; rag=; icl=; weight_edits="


# -- answers: the engine, the chat session, the server --------------------------------------------------------
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    engine, store, ids = scoped_pool_engine(tmp_path_factory.mktemp("provenance"), embedder=HashEmbedder())
    try:
        with serving(create_app(engine, api_keys=[KEY])) as base:
            yield {"engine": engine, "url": base, "japan": ids[0], "peru": ids[1],
                   "client": openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=30)}
    finally:
        engine.close()
        store.engine.dispose()


def test_an_answer_reports_the_rows_it_read_for_its_user(served):
    engine, japan, peru = served["engine"], served["japan"], served["peru"]
    greedy = SamplingParams(temperature=0, max_tokens=4)
    bob = engine.complete(engine.prepare("engram", BOTH, "bob"), greedy).provenance["pool"]
    alice = engine.complete(engine.prepare("engram", BOTH, "alice"), greedy).provenance["pool"]
    assert bob["rows_read"] == bob["rows_mentioned"] == [japan]  # alice's Peru row is outside bob's view
    assert alice["rows_read"] == alice["rows_mentioned"] == sorted([japan, peru])
    assert alice["rows_in_view"] == 2 and bob["rows_in_view"] == 1
    base = engine.complete(engine.prepare("base", BOTH, "alice"), greedy).provenance
    assert base["pool"] is None  # the baselines read no pool


def test_the_chat_sessions_why_and_the_in_process_langchain_model_show_the_rows_read(served):
    from agent.adapters.langchain import ChatEngram
    from agent.chat.session import ChatSession

    engine, japan = served["engine"], served["japan"]
    session = ChatSession(engine, user="bob", params=SamplingParams(temperature=0, max_tokens=4),
                          agent_running=False)
    out: list[str] = []
    session.handle(JAPAN[0]["content"], out.append)
    session.handle("/why", out.append)
    assert json.loads(out[-1])["pool"]["rows_read"] == [japan]
    reply = ChatEngram(engine=engine, user="bob", max_tokens=4, temperature=0).invoke(JAPAN[0]["content"])
    assert reply.response_metadata["engram"]["provenance"]["pool"]["rows_read"] == [japan]


def test_the_server_sends_the_rows_read_in_the_engram_field_and_the_header(served):
    client, japan = served["client"], served["japan"]
    raw = client.chat.completions.with_raw_response.create(model="engram", messages=JAPAN, max_tokens=4,
                                                           temperature=0, user="bob")
    assert raw.parse().choices[0].message.role == "assistant"
    assert json.loads(raw.text)["engram"]["provenance"]["pool"]["rows_read"] == [japan]
    assert raw.headers["x-engram-provenance"] == f"pool={japan}; pool_mentioned={japan}; rag=; icl=; weight_edits="
    rag = client.chat.completions.with_raw_response.create(model="rag", messages=JAPAN, max_tokens=2, user="bob")
    hits = json.loads(rag.text)["engram"]["provenance"]["rag_hits"]
    assert hits and rag.headers["x-engram-provenance"] == (
        f"pool=; pool_mentioned=; rag={','.join(str(h['fact_id']) for h in hits)}; icl=; weight_edits=")


def test_a_stream_ends_with_a_finish_chunk_that_carries_the_rows_read(served):
    client, url, japan = served["client"], served["url"], served["japan"]
    stream = client.chat.completions.create(model="engram", messages=JAPAN, max_tokens=4, temperature=0,
                                            user="bob", stream=True)
    chunks = list(stream)
    assert stream.response.headers["x-engram-provenance"] == f"pool_mentioned={japan}; rag=; icl=; weight_edits="
    assert all(c.choices for c in chunks) and chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].model_extra["engram"]["provenance"]["pool"]["rows_read"] == [japan]
    # n = 2 with usage: each choice's finish chunk, the last one with `engram`, then usage and [DONE]
    payloads = raw_stream(url, {"model": "engram", "messages": JAPAN, "max_tokens": 3, "user": "bob", "n": 2,
                                "stream": True, "stream_options": {"include_usage": True}})
    *body, usage, done = [json.loads(p) if p != "[DONE]" else p for p in payloads]
    assert done == "[DONE]" and usage["choices"] == [] and usage["usage"]["completion_tokens"] > 0
    finishes = [c for c in body if c["choices"][0]["finish_reason"]]
    assert [c["choices"][0]["index"] for c in finishes] == [0, 1] and body[-1] is finishes[-1]
    assert "engram" not in finishes[0] and finishes[1]["engram"]["provenance"]["pool"]["rows_read"] == [japan]


def test_the_langchain_model_over_http_gets_the_rows_read_from_the_last_chunk(served):
    from agent.adapters.langchain import ChatEngram

    model = ChatEngram(base_url=f"{served['url']}/v1", api_key=KEY, user="bob", max_tokens=4, temperature=0)
    reply = model.invoke(JAPAN[0]["content"])
    assert reply.response_metadata["engram"]["provenance"]["pool"]["rows_read"] == [served["japan"]]
    assert reply.response_metadata["engram"]["route"] == "engram"
    last = list(model.stream(JAPAN[0]["content"]))[-1]
    assert last.response_metadata["engram"]["provenance"]["pool"]["rows_read"] == [served["japan"]]
