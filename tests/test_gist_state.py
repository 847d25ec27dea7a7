"""The gist route of a store: facts compressed into the pool, persisted, reconciled after a crash."""
from __future__ import annotations

import shutil

import torch

from editors.gist_state import GistState
from editors.incomes import GistAddon, GistConfig
from editors.incomes.memory import GistMemory
from editors.model import tiny_llama, tiny_tokenizer
from memory.facts import FactInput


def memory_for(model, tokenizer, addon):
    return GistMemory(model, tokenizer, addon)


def test_add_persist_reconcile_and_remove(store):
    model, tok = tiny_llama(), tiny_tokenizer()
    addon = GistAddon.for_model(model, GistConfig())
    ids = store.add_facts([FactInput(prompt="Ann lives in", target="Oslo"),
                           FactInput(text="Bob's dog is called Rex.", scope="user", user_id="bob")]).new_ids
    state = GistState(store, memory_for(model, tok, addon))
    assert state.open() == 0
    state.add([store.get_fact(i) for i in ids])
    assert store.counts()["edits"] == {"gist": {"applied": 2}}
    assert state.memory.pool.scope_of(ids[1]) == "bob"
    keys = state.memory.pool.view_all().keys.clone()
    state.memory.close()

    # a restart: the pool comes back from its files, identical
    again = GistState(store, memory_for(model, tok, GistAddon.for_model(model, GistConfig())))
    again.memory.addon.load_state_dict(addon.state_dict())
    assert again.open() == 2
    assert torch.equal(again.memory.pool.view_all().keys, keys)

    # a crash after the pool's segment was written but before the rows were committed: the stray row goes
    stray = store.add_facts([FactInput(prompt="Cid works at", target="Acme")]).new_ids[0]
    again.memory.add([stray], ["Cid works at Acme"])
    again.segments.append(again.memory.pool, [stray])
    again.memory.close()
    third = GistState(store, memory_for(model, tok, addon))
    assert third.open() == 2 and stray not in third.memory.pool

    third.remove(ids[0])
    assert ids[0] not in third.memory.pool
    assert store.counts()["edits"]["gist"] == {"applied": 1, "rolled_back": 1}
    third.memory.close()


def one_gist_fact(store):
    """A store with one fact, "Ann lives in Oslo", in the pool of a fresh add-on: (model, tok, addon, ids, state)."""
    model, tok = tiny_llama(), tiny_tokenizer()
    addon = GistAddon.for_model(model, GistConfig())
    ids = store.add_facts([FactInput(prompt="Ann lives in", target="Oslo")]).new_ids
    state = GistState(store, memory_for(model, tok, addon))
    state.open()
    state.add([store.get_fact(ids[0])])
    return model, tok, addon, ids, state


def test_missing_pool_files_are_rebuilt_from_the_store(store):
    model, tok, addon, ids, state = one_gist_fact(store)
    state.memory.close()
    shutil.rmtree(state.path)
    rebuilt = GistState(store, memory_for(model, tok, addon))
    assert rebuilt.open() == 1 and ids[0] in rebuilt.memory.pool
    rebuilt.memory.close()


def test_rows_of_a_pool_written_without_answers_get_them_from_the_store(store):
    model, tok, addon, ids, state = one_gist_fact(store)
    expected = state.memory.pool.answers_of(ids[0])
    assert expected and expected[0] == tok(" Oslo", add_special_tokens=False)["input_ids"]
    state.memory.pool.set_answers(ids[0], [])  # as a pool written before the answer copy
    state.segments.rewrite(state.memory.pool)
    state.memory.close()
    again = GistState(store, memory_for(model, tok, addon))
    assert again.open() == 1 and again.memory.pool.answers_of(ids[0]) == expected
    again.memory.close()
    assert again.segments.load().answers_of(ids[0]) == expected  # and the files were rewritten with them
    assert len(again.segments.manifest()["segments"]) == 1  # as one fresh segment


def test_a_pool_compressed_by_another_addon_is_compressed_again(store, caplog):
    model, tok = tiny_llama(), tiny_tokenizer()
    old = GistAddon.for_model(model, GistConfig(gists_per_fact=2))
    ids = store.add_facts([FactInput(prompt="Ann lives in", target="Oslo"),
                           FactInput(prompt="Bob works at", target="Acme")]).new_ids
    state = GistState(store, memory_for(model, tok, old))
    state.open()
    state.add([store.get_fact(i) for i in ids])
    state.memory.close()
    new = GistAddon.for_model(model, GistConfig())  # another add-on: one gist per fact, other weights
    fresh = GistState(store, memory_for(model, tok, new))
    assert fresh.open() == 2 and "compressed by another gist add-on" in caplog.text
    expected = fresh.memory.pool.view_all().keys.clone()
    assert expected.shape[2] == new.pool_heads  # the rows are the new add-on's, not the file's
    fresh.memory.close()
    again = GistState(store, memory_for(model, tok, new))
    assert again.open() == 2  # the files now hold the new add-on's gists, read as they are
    assert torch.equal(again.memory.pool.view_all().keys, expected)
    again.memory.close()
