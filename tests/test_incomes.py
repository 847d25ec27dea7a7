"""InComeS gist add-on: identity with an empty pool, the hook contract, compression, the pool."""
from __future__ import annotations

import pytest
import torch

from editors.incomes import (CompressedGists, GistAddon, GistConfig, GistHookError, GistPool, add_gist_token,
                             compress_ids, compress_texts)
from editors.incomes.introspect import find_attentions, find_layer_stack, rope_function, split_call
from editors.model import tiny_llama, tiny_tokenizer
from memory.errors import ConfigError, NotFoundError, ValidationError

VOCAB = 128
GIST_ID = VOCAB  # past the embedding matrix, as a freshly added token is: exercises the id mapping


def tiny_qwen2(seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False)
    return Qwen2ForCausalLM(cfg).eval()


def tiny_gemma3(seed: int = 0):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=32, sliding_window=8,
                           max_position_embeddings=256, query_pre_attn_scalar=32)
    model = Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():  # make q_norm / k_norm non-trivial, so forgetting them would show
        for attn in find_attentions(model):
            attn.q_norm.weight.normal_(0, 0.5)
            attn.k_norm.weight.normal_(0, 0.5)
    return model


BUILDERS = {"llama": lambda: tiny_llama(vocab_size=VOCAB), "qwen2": tiny_qwen2, "gemma3": tiny_gemma3}
IDS = torch.tensor([[5, 17, 42, 9, 77, 3, 61, 28, 90, 11, 7, 33]])  # [1, 12]
FACTS = [[12, 40, 41, 7], [99, 3, 5, 6, 8, 20, 21], [60, 61, 62], [30, 31, 32, 33, 34]]


def attached(model, **cfg):
    addon = GistAddon.for_model(model, GistConfig(**cfg))
    addon.attach(model, GIST_ID)
    return addon


def pool_of(model, addon, facts=FACTS, scopes=None):
    pool = GistPool.for_addon(addon)
    pool.append(list(range(len(facts))), compress_ids(model, addon, facts), scopes)
    return pool


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_empty_pool_is_bit_identical_and_keys_unchanged(arch):
    model = BUILDERS[arch]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    base = model(IDS).logits
    addon = attached(model, adapter_rank=4, zero_key_init_std=0.1, gate_init=1.0, read_rank=3)
    assert list(model.state_dict()) == list(before)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(model(IDS).logits, base)  # attached, no pool
    empty = GistPool.for_addon(addon)
    with empty.activate(addon):
        assert torch.equal(model(IDS).logits, base)  # attached, empty pool
    with pool_of(model, addon).activate(addon, user_id="nobody-sees-global-only"):
        assert not torch.allclose(model(IDS).logits, base)  # a pool is read
    with addon.use(None):
        assert torch.equal(model(IDS).logits, base)


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_attention_hook_contract(arch):
    """If this fails, a transformers upgrade changed the attention internals the gist hook relies on:
    fix editors/incomes/introspect.py + hooks.py before trusting any gist result."""
    import transformers

    assert transformers.__version__.split(".")[0] == "5", "the gist hook is written against transformers 5.x"
    model = BUILDERS[arch]()
    model.config._attn_implementation = "eager"
    addon = attached(model)
    attn = find_attentions(model)[addon.layer_ids[0]]
    seen, o_inputs = {}, []
    pre = attn.register_forward_pre_hook(lambda m, a, k: seen.update(call=split_call(a, k)), with_kwargs=True)
    post = attn.register_forward_hook(lambda m, a, out: seen.update(weights=out[1]))
    o_hook = attn.o_proj.register_forward_pre_hook(lambda m, a: o_inputs.append(a[0].shape))
    try:
        model(IDS)
    finally:
        pre.remove(), post.remove(), o_hook.remove()
    hidden, (cos, sin) = seen["call"]
    d = addon.dims
    assert o_inputs == [(1, IDS.shape[1], d.n_heads * d.head_dim)], \
        f"o_proj must run once per forward on the per-head outputs; saw {o_inputs}"
    q = addon.branches[str(addon.layer_ids[0])].queries(attn, hidden, (cos, sin))  # [1, H, T, D]
    k = attn.k_proj(hidden).view(1, IDS.shape[1], d.n_kv_heads, d.head_dim).transpose(1, 2)
    if hasattr(attn, "k_norm"):
        k = attn.k_norm(k)
    _, k = rope_function(attn)(k, k, cos, sin)
    k = k.repeat_interleave(d.n_heads // d.n_kv_heads, dim=1)  # [1, H, T, D]
    scores = q @ k.transpose(-1, -2) * attn.scaling  # [1, H, T, T]
    causal = torch.ones(IDS.shape[1], IDS.shape[1], dtype=torch.bool).tril()
    window = getattr(attn, "sliding_window", None)
    if window:
        causal &= ~torch.ones_like(causal).tril(-window)
    expected = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    assert torch.allclose(seen["weights"], expected, atol=1e-5), \
        "gist-branch queries (q_proj, q_norm, RoPE, scaling) no longer match self-attention's"


def test_detach_restores_the_original_modules():
    model = tiny_llama(vocab_size=VOCAB)
    modules = dict(model.named_modules())
    hook_counts = {n: (len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in modules.items()}
    base = model(IDS).logits
    addon = attached(model, adapter_rank=2)
    pool = pool_of(model, addon)
    with pool.activate(addon):
        assert not torch.equal(model(IDS).logits, base)
    addon.detach()
    assert dict(model.named_modules()) == modules  # the very same module objects
    assert {n: (len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in modules.items()} == hook_counts
    assert torch.equal(model(IDS).logits, base)
    with pytest.raises(GistHookError):
        with addon.use(pool.view()):
            pass
    addon.attach(model, GIST_ID)  # re-attachable
    with pytest.raises(GistHookError):
        addon.attach(model, GIST_ID)


def test_tokens_at_or_before_a_gist_never_read_the_pool():
    model = tiny_llama(vocab_size=VOCAB)
    addon = attached(model, zero_key_init_std=0.1)
    ids = torch.tensor([[5, 17, 42, GIST_ID, 9, 77, 3]])  # gist at position 3
    plain = model(ids).logits
    with pool_of(model, addon).activate(addon):
        read = model(ids).logits
    assert torch.allclose(read[:, :4], plain[:, :4], atol=1e-6, rtol=0)
    assert not torch.allclose(read[:, 4:], plain[:, 4:], atol=1e-4)


def test_compression_takes_pre_rope_keys_at_the_gist_position_per_fact():
    model = tiny_gemma3()
    addon = attached(model)
    batched = compress_ids(model, addon, FACTS)
    assert batched.keys.shape == (len(addon.layer_ids), len(FACTS), 1, 32)
    for i, fact in enumerate(FACTS):  # facts are compressed independently of their batch-mates
        alone = compress_ids(model, addon, [fact])
        assert torch.allclose(alone.keys[:, 0], batched.keys[:, i], atol=1e-5)
        assert torch.allclose(alone.values[:, 0], batched.values[:, i], atol=1e-5)
    # an independent route: the layer's input at the gist position through k_proj and k_norm, no RoPE
    _, layers = find_layer_stack(model)
    ids = torch.tensor([FACTS[0] + [GIST_ID]])
    hidden_states = model(ids, output_hidden_states=True).hidden_states
    for pos, idx in enumerate(addon.layer_ids):
        layer = layers[idx]
        h = layer.input_layernorm(hidden_states[idx])[0, -1]  # [C]
        k = layer.self_attn.k_norm(layer.self_attn.k_proj(h).view(1, 32))  # [KVH, D]
        v = layer.self_attn.v_proj(h).view(1, 32)
        assert torch.allclose(batched.keys[pos, 0], k, atol=1e-5)
        assert torch.allclose(batched.values[pos, 0], v, atol=1e-5)


def test_gist_token_and_text_compression():
    model, tok = tiny_llama(vocab_size=VOCAB), tiny_tokenizer()
    gist_id = add_gist_token(tok)
    assert add_gist_token(tok) == gist_id and tok.convert_ids_to_tokens(gist_id) == "<GIST>"
    addon = GistAddon.for_model(model)
    weight = model.get_input_embeddings().weight
    assert torch.allclose(addon.gist_embedding, weight.mean(0))  # mean of the existing rows
    addon.attach(model, gist_id)
    gists = compress_texts(model, tok, addon, ["Japan's capital is Nairobi.", "Oslo is in Peru."])
    assert len(gists) == 2 and gists.layers == addon.layer_ids
    assert model.get_input_embeddings().weight.shape == weight.shape  # the base matrix is not resized


def test_pool_append_remove_persist_reload(tmp_path):
    model = tiny_llama(vocab_size=VOCAB)
    addon = attached(model)
    gists = compress_ids(model, addon, FACTS)
    pool = GistPool.for_addon(addon)
    pool.append([10, 11], gists.select([0, 1]))
    kept = pool.view_all().keys.clone()
    pool.append([12, 13], gists.select([2, 3]), scopes=["alice", None])
    assert torch.equal(pool.view_all().keys[:, :2], kept)  # old rows untouched by an append
    pool.remove(11)
    assert pool.fact_ids == (10, 12, 13)
    assert torch.equal(pool.view_all().keys, gists.keys[:, [0, 2, 3]])
    with pytest.raises(NotFoundError):
        pool.remove(11)
    with pytest.raises(ValidationError):
        pool.append([10], gists.select([0]))  # duplicate id
    assert pool.bytes_per_fact() == len(addon.layer_ids) * 2 * 2 * 16 * 4
    path = pool.save(tmp_path / "pool.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["pool.safetensors"]  # no temp file left behind
    again = GistPool.load(path)
    assert again.fact_ids == pool.fact_ids and again.scope_of(12) == "alice" and again.scope_of(13) is None
    assert torch.equal(again.view_all().keys, pool.view_all().keys)
    assert torch.equal(again.view_all().values, pool.view_all().values)
    for fid in again.fact_ids:
        again.remove(fid)
    again.save(path)
    assert len(GistPool.load(path)) == 0
    (tmp_path / "bad.safetensors").write_bytes(b"not a pool")
    with pytest.raises(ConfigError):
        GistPool.load(tmp_path / "bad.safetensors")


def test_scoped_views():
    model = tiny_llama(vocab_size=VOCAB)
    addon = attached(model)
    pool = pool_of(model, addon, scopes=[None, "alice", "bob", None])
    assert pool.view().fact_ids == (0, 3)
    assert pool.view("alice").fact_ids == (0, 1, 3)
    assert pool.view("bob").fact_ids == (0, 2, 3)
    assert torch.equal(pool.view("bob").keys, pool.view_all().keys[:, [0, 2, 3]])
    with pool.activate(addon, "alice"):
        alice = model(IDS).logits
    with pool.activate(addon, "bob"):
        assert not torch.allclose(model(IDS).logits, alice)


def test_temperature_applies_at_inference_above_ten_gists():
    model = tiny_llama(vocab_size=VOCAB)
    addon = attached(model, zero_key_init_std=0.1)
    facts = [[(7 * i + j) % 100 + 4 for j in range(5)] for i in range(11)]
    gists = compress_ids(model, addon, facts)
    assert addon.temperature(11) == pytest.approx(0.45) and addon.temperature(10) == 1.0

    def logits(n, training):
        addon.train(training)
        with addon.use(gists.select(range(n))):
            return model(IDS).logits

    assert torch.equal(logits(10, False), logits(10, True))  # <= 10 gists: no temperature
    assert not torch.allclose(logits(11, False), logits(11, True))  # > 10 at inference: T = 0.45
    addon.eval()


def test_addon_trains_and_round_trips(tmp_path):
    model = tiny_llama(vocab_size=VOCAB).requires_grad_(False)  # the base is frozen, as load_model leaves it
    addon = attached(model, adapter_rank=2, gate_init=1.0)
    gists = compress_ids(model, addon, FACTS, grad=True)
    with addon.use(gists):
        model(IDS).logits.square().mean().backward()
    grads = {n: p.grad for n, p in addon.named_parameters()}
    assert grads["gist_embedding"] is not None and grads["branches.3.zero_key"] is not None
    assert grads["compress_lora.0_k_proj.B.weight"] is not None  # compression-pass adapter trains
    assert all(p.grad is None for p in model.parameters())
    addon.save(tmp_path / "addon")
    loaded = GistAddon.load(tmp_path / "addon", model)
    assert loaded.config == addon.config and loaded.dims == addon.dims
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), addon.state_dict().values()))
    with pytest.raises(ConfigError):
        GistAddon.load(tmp_path / "addon", tiny_llama(vocab_size=VOCAB, layers=6))


def grown_after_reading(model, addon, grow):
    """(gists, logits reading them, the grown add-on `grow(addon)` attached in place of `addon`)."""
    gists = compress_ids(model, addon, FACTS)
    with addon.use(gists):
        before = model(IDS).logits
    addon.detach()
    grown = grow(addon)
    grown.attach(model, GIST_ID)
    return gists, before, grown


def test_growing_a_query_conditioned_read_keeps_outputs_then_trains(tmp_path):
    model = tiny_llama(vocab_size=VOCAB).requires_grad_(False)
    addon = attached(model, adapter_rank=2, gate_init=1.0)
    gists, before, grown = grown_after_reading(model, addon, lambda a: a.with_read_rank(3))
    assert grown.config.read_rank == 3 and grown.branches["3"].read is not None
    with grown.use(gists):
        assert torch.equal(model(IDS).logits, before)  # the new read starts at zero: same outputs
        model(IDS).logits.square().mean().backward()
    assert grown.branches["3"].read.out.weight.grad.abs().sum() > 0  # and it trains
    with torch.no_grad():
        grown.branches["3"].read.out.weight.normal_()
    with grown.use(gists):
        assert not torch.allclose(model(IDS).logits, before)
    grown.save(tmp_path / "grown")
    assert GistAddon.load(tmp_path / "grown", model).config.read_rank == 3
    with pytest.raises(ConfigError, match="can only grow"):
        grown.with_read_rank(3)
    wider = grown.with_read_rank(5)  # a read grows like the adapters: trained ranks kept, new ones at zero
    assert torch.equal(wider.branches["3"].read.out.weight[:, :3], grown.branches["3"].read.out.weight)
    assert not wider.branches["3"].read.out.weight[:, 3:].any()


def test_growing_the_adapter_rank_keeps_outputs_then_trains():
    model = tiny_llama(vocab_size=VOCAB).requires_grad_(False)
    addon = attached(model, adapter_rank=2, gate_init=1.0)
    with torch.no_grad():  # trained-looking adapters, so that keeping them is tested
        for name, p in addon.named_parameters():
            if name.endswith(".B.weight"):
                p.normal_(0, 0.1)
    gists, before, grown = grown_after_reading(model, addon, lambda a: a.with_adapter_rank(6))
    assert grown.config.adapter_rank == 6 and grown.config.adapter_alpha == addon.config.adapter_alpha * 3
    assert grown.branches["3"].lora_q.scale == addon.branches["3"].lora_q.scale
    grown_gists = compress_ids(model, grown, FACTS, grad=True)  # the compression-pass adapters grew too
    assert torch.allclose(grown_gists.values.detach(), gists.values, atol=1e-5)
    with grown.use(grown_gists):
        assert torch.allclose(model(IDS).logits, before, atol=1e-5)  # new ranks start at zero: same outputs
        model(IDS).logits.square().mean().backward()
    for lora in (grown.compress_lora["3_v_proj"], grown.branches["3"].lora_q):  # and the new ranks train
        assert lora.B.weight.grad[:, 2:].abs().sum() > 0
    with pytest.raises(ConfigError, match="can only grow"):
        grown.with_adapter_rank(6)


def test_config_validates():
    assert GistConfig().layers_for(30) == tuple(range(15, 30))
    assert GistConfig(upper_layers=(5, 2)).upper_layers == (2, 5)
    for bad in ({"temperature": 0}, {"adapter_rank": -1}, {"compress_targets": ("mlp",)},
                {"upper_layers": ()}, {"gist_token": ""}):
        with pytest.raises(ConfigError):
            GistConfig(**bad)
    with pytest.raises(ConfigError):
        GistConfig(upper_layers=(40,)).layers_for(30)
    assert GistConfig.from_dict(GistConfig(adapter_rank=3).to_dict()) == GistConfig(adapter_rank=3)


def test_generate_with_a_pool_matches_full_forwards():
    model = tiny_llama(vocab_size=VOCAB)
    model.requires_grad_(False)
    addon = attached(model, zero_key_init_std=0.1)
    pool = pool_of(model, addon)
    with pool.activate(addon):
        out = model.generate(IDS, max_new_tokens=5, do_sample=False, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True)
        full = model(out.sequences).logits[0, IDS.shape[1] - 1:-1]  # [5, V]: every step, uncached
    cached = torch.cat(out.logits)  # [5, V]: the decode steps, each on the KV cache
    # Cached and uncached forwards run other kernels (other shapes): equal within a tolerance, not in every bit.
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=1e-4)
    assert torch.equal(out.sequences[0, IDS.shape[1]:], cached.argmax(-1))


@pytest.mark.slow
def test_default_model_empty_pool_is_bit_identical(default_model):
    model, tok = default_model.model, default_model.tokenizer
    enc = tok(["The capital of France is", "Who wrote Hamlet? The answer is"], return_tensors="pt", padding=True)
    base = model(**enc).logits
    gist_id = add_gist_token(tok)
    addon = GistAddon.for_model(model)
    assert addon.layer_ids == tuple(range(15, 30))
    addon.attach(model, gist_id)
    try:
        pool = GistPool.for_addon(addon)
        assert pool.bytes_per_fact() == 15 * 2 * 3 * 64 * 4
        with pool.activate(addon):
            assert torch.equal(model(**enc).logits, base)
        pool.append([1], compress_texts(model, tok, addon, ["The capital of France is Rome."]))
        with pool.activate(addon):
            assert not torch.equal(model(**enc).logits, base)
    finally:
        addon.detach()
    assert torch.equal(model(**enc).logits, base)
    assert isinstance(CompressedGists, type)
