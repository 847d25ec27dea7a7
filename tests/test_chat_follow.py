"""A chat engine beside a writer on the same store (issue 23 item 4): it picks up new weight edits, rollbacks
and pool facts between answers, and every answer uses one model version from its first token to its last.

The writer is what `engram run` or `engram edit` is: its own ModelState (and model) holding the writer lock,
editing with the fake ScaleEditor of tests/fakes.py. The engine is a reader over another copy of the tiny
model. Nothing depends on the tiny model's exact output: an answer is compared with the answer of a third
model rebuilt at the version the answer reports.
"""
from __future__ import annotations

import threading

import torch

from agent.chat import ChatEngine, EngineConfig, SamplingParams
from editors.base import apply_delta
from editors.model import tiny_llama, tiny_tokenizer
from editors.state import ModelState
from memory.store import FactStore
from tests.fakes import ScaleEditor, add_targets, new_gist_state, weights, writer_state

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
ASK = [{"role": "user", "content": "What is Fact 3?"}]
GREEDY = SamplingParams(temperature=0, max_tokens=12)


def reader(url: str, gist=None, open_memory=None) -> ChatEngine:
    store = FactStore(url)
    state = ModelState(store, tiny_llama())
    state.rebuild(sweep=False)
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = TEMPLATE
    return ChatEngine(state.model, tokenizer, "tiny", state=state, gist=gist, store=store,
                      config=EngineConfig(follow_every_s=0.0), open_memory=open_memory)


def at_version(store: FactStore, version: int) -> torch.nn.Module:
    """A fresh tiny model with the deltas of the edits applied up to `version`, in order."""
    model = tiny_llama()
    state = ModelState(store, model)
    for edit in state.applied_edits():
        if edit.model_version <= version:
            apply_delta(model, state._load_delta(edit))
    return model


def answer(engine: ChatEngine, route: str = "engram"):
    return engine.complete(engine.prepare(route, ASK), GREEDY)


def test_the_engine_follows_new_edits_and_rollbacks_of_the_writer(tmp_path):
    url = f"sqlite:///{tmp_path / 'store.sqlite'}"
    FactStore(url, create=True)
    store, writer = writer_state(url)
    engine = reader(url)
    before = answer(engine)
    assert before.model_version == 0
    editor = ScaleEditor(writer.model)
    ids = add_targets(store, "A", "B", "C")
    for fact in writer.pending_facts():
        writer.apply(fact, editor, "scale")
    after = answer(engine)
    assert after.model_version == writer.version == 3
    assert all(torch.equal(weights(engine.model)[k], v) for k, v in weights(writer.model).items())
    assert after.provenance["weight_edits"] == ids
    writer.rollback(ids[1], {"scale": editor})  # out of the middle: the engine must rebuild, not append
    rolled = answer(engine)
    assert rolled.model_version == writer.version > 3  # the rollback, and the later fact edited again
    assert all(torch.equal(weights(engine.model)[k], v) for k, v in weights(writer.model).items())
    assert rolled.provenance["weight_edits"] == [ids[0], ids[2]]
    base = answer(engine, "base")  # the base route still answers with the base weights
    fresh = ChatEngine(tiny_llama(), engine.tokenizer, "tiny")
    assert base.choices[0].text == answer(fresh, "base").choices[0].text
    engine.close()
    writer.close()


def test_answers_during_twenty_edits_each_use_one_version_that_existed(tmp_path):
    url = f"sqlite:///{tmp_path / 'store.sqlite'}"
    FactStore(url, create=True)
    store, writer = writer_state(url)
    engine = reader(url)
    add_targets(store, *[f"T{i}" for i in range(20)])
    editor = ScaleEditor(writer.model, sleep_s=0.05)  # edits slow enough for answers to land between them

    def edit_all():
        for fact in writer.pending_facts():
            writer.apply(fact, editor, "scale")

    editing = threading.Thread(target=edit_all)
    editing.start()
    answers = []
    while editing.is_alive() or len(answers) < 3:
        stream = engine.start(engine.prepare("engram", ASK), GREEDY)
        answers.append(engine.collect(stream))
    editing.join()
    answers.append(answer(engine))
    versions = [a.model_version for a in answers]
    assert versions == sorted(versions) and versions[-1] == 20  # never back in time, and caught up
    assert set(versions) <= set(range(21)) and len(set(versions)) >= 3  # answers landed between edits
    tokenizer = engine.tokenizer
    for a in {a.model_version: a for a in answers}.values():  # each answer is that version's own answer
        model = at_version(store, a.model_version)
        expected = ChatEngine(model, tokenizer, "tiny").complete(
            ChatEngine(model, tokenizer, "tiny").prepare("base", ASK), GREEDY)
        assert a.choices[0].text == expected.choices[0].text, f"version {a.model_version}"
    engine.close()
    writer.close()


def test_the_engine_loads_the_pool_once_the_writer_writes_it(tmp_path):
    url = f"sqlite:///{tmp_path / 'store.sqlite'}"
    FactStore(url, create=True)
    store = FactStore(url)
    torch.manual_seed(0)
    writer_gist = new_gist_state(store)

    def open_memory():
        torch.manual_seed(0)
        return new_gist_state(store).memory

    engine = reader(url, open_memory=open_memory)
    assert answer(engine).provenance["pool"] is None  # no pool yet
    ids = add_targets(store, "Q")
    with store.transaction() as s:
        from memory.models import Fact

        facts = [s.get(Fact, i) for i in ids]
    writer_gist.add(facts)
    assert writer_gist.path.exists()
    answer(engine)
    assert engine.gist is not None and sorted(engine.gist.memory.pool.fact_ids) == ids
    engine.close()
