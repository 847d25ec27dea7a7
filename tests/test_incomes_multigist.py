"""Several gists per fact (GistConfig.gists_per_fact): compression, the pool row, reading, gating, growing."""
from __future__ import annotations

import pytest
import torch

from editors.incomes import CompressedGists, GistAddon, GistPool, compress_ids
from editors.incomes.introspect import find_layer_stack
from editors.incomes.train_config import make_optimizer
from editors.model import tiny_llama
from memory.errors import ConfigError
from tests.test_incomes import FACTS, GIST_ID, IDS, VOCAB, attached, tiny_gemma3

LONG = FACTS + [list(range(4, 40))]  # one long fact: the batch is mostly padding, so it is packed


def test_each_gist_of_a_fact_is_compressed_at_its_own_position_with_its_own_embedding():
    model = tiny_gemma3()
    addon = attached(model, gists_per_fact=2)
    with torch.no_grad():
        addon.later_gist_embeddings.normal_()  # unlike the first, so a mix-up of the two would show
    padded = compress_ids(model, addon, FACTS)
    packed = compress_ids(model, addon, LONG)
    assert padded.keys.shape == (len(addon.layer_ids), len(FACTS), 2, 32)  # Gemma: 1 KV head, twice
    assert torch.allclose(packed.keys[:, :len(FACTS)], padded.keys, atol=1e-5)
    # an independent route: run [fact, <GIST>, <GIST>] and take k_norm(k_proj(.)) at each gist position
    _, layers = find_layer_stack(model)
    fact = FACTS[1]
    hidden_states = model(torch.tensor([fact + [GIST_ID, GIST_ID]]), output_hidden_states=True).hidden_states
    for pos, idx in enumerate(addon.layer_ids):
        attn = layers[idx].self_attn
        for gist in range(2):
            h = layers[idx].input_layernorm(hidden_states[idx])[0, len(fact) + gist]  # [C]
            k = attn.k_norm(attn.k_proj(h).view(1, 32))  # [KVH, D]
            assert torch.allclose(padded.keys[pos, 1, gist:gist + 1], k, atol=1e-5)
            assert torch.allclose(padded.values[pos, 1, gist:gist + 1], attn.v_proj(h).view(1, 32), atol=1e-5)


def test_reading_a_facts_gists_is_reading_them_as_separate_rows():
    model = tiny_llama(vocab_size=VOCAB)
    two = attached(model, gists_per_fact=2, zero_key_init_std=0.1)
    gists = compress_ids(model, two, FACTS)
    with two.use(gists):
        read_by_fact = model(IDS).logits
    two.detach()
    one = attached(model, zero_key_init_std=0.1)  # the same branch weights, one gist per pool row
    state = {k: v for k, v in two.state_dict().items() if k != "later_gist_embeddings"}
    one.load_state_dict(state)
    L, N, KVH2, D = gists.keys.shape
    as_rows = CompressedGists(gists.layers, gists.keys.reshape(L, N * 2, KVH2 // 2, D),
                              gists.values.reshape(L, N * 2, KVH2 // 2, D))
    with one.use(as_rows):
        assert torch.allclose(model(IDS).logits, read_by_fact, atol=1e-5)


def test_pool_rows_hold_all_of_a_facts_gists_and_the_mention_gate_hides_them_together():
    model = tiny_llama(vocab_size=VOCAB)
    addon = attached(model, gists_per_fact=3, zero_key_init_std=0.1)
    gists = compress_ids(model, addon, FACTS)
    pool = GistPool.for_addon(addon)
    pool.append([0, 1, 2, 3], gists, anchors=[[[5, 17]], [[61, 28]], [[99, 98]], [[1, 2]]])
    assert pool.bytes_per_fact() == len(addon.layer_ids) * 2 * (3 * 2) * 16 * 4  # 3 gists of 2 KV heads
    with pool.activate(addon):
        gated = model(IDS).logits  # IDS mention facts 0 and 1 only
    only_mentioned = GistPool.for_addon(addon)
    only_mentioned.append([0, 1], gists.select([0, 1]))
    with only_mentioned.activate(addon):
        assert torch.allclose(model(IDS).logits, gated, atol=1e-5)
    pool.remove(1)
    assert torch.equal(pool.view_all().keys, gists.keys[:, [0, 2, 3]])


def test_growing_gists_per_fact_keeps_the_first_gist_and_trains_the_new_one(tmp_path):
    model = tiny_llama(vocab_size=VOCAB).requires_grad_(False)
    addon = attached(model, adapter_rank=2, gate_init=1.0)
    with torch.no_grad():
        addon.gist_embedding.normal_()  # a trained-looking embedding, so that copying it is tested
    before = compress_ids(model, addon, FACTS)
    addon.detach()
    grown = addon.with_gists_per_fact(2)
    assert torch.equal(grown.later_gist_embeddings[0], addon.gist_embedding)
    grown.attach(model, GIST_ID)
    gists = compress_ids(model, grown, FACTS, grad=True)
    assert torch.allclose(gists.keys[:, :, :2].detach(), before.keys, atol=1e-5)  # first gist: what it was
    with grown.use(gists):
        model(IDS).logits.square().mean().backward()
    assert grown.later_gist_embeddings.grad.abs().sum() > 0
    fast = make_optimizer(grown).param_groups[1]["params"]
    assert any(p is grown.later_gist_embeddings for p in fast)  # it starts where the fast-lr embedding is
    grown.save(tmp_path / "grown")
    loaded = GistAddon.load(tmp_path / "grown", model)
    assert loaded.config.gists_per_fact == 2 and torch.equal(loaded.later_gist_embeddings, grown.later_gist_embeddings)
    assert grown.grown_to(grown.config) is grown
    with pytest.raises(ConfigError, match="can only grow"):
        grown.with_gists_per_fact(2)
    with pytest.raises(ConfigError, match="gists_per_fact"):
        attached(tiny_llama(vocab_size=VOCAB), gists_per_fact=0)


def test_an_empty_pool_stays_bit_identical_with_several_gists_per_fact():
    model = tiny_llama(vocab_size=VOCAB)
    plain = model(IDS).logits
    addon = attached(model, gists_per_fact=2, adapter_rank=2)
    with GistPool.for_addon(addon).activate(addon):
        assert torch.equal(model(IDS).logits, plain)
