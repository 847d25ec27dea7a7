"""The weight editors (ICE, FT-M): one test table over both, on a tiny config-built Llama (no downloads),
plus one slow test that edits three counterfactuals into the real default model."""
from __future__ import annotations

import math

import pytest
import torch

from editors.base import EditRequest, Editor, apply_delta, restore, snapshot
from editors.ft import FTConfig, FTEditor
from editors.ice import ICEConfig, ICEEditor, filter_logits
from editors.layers import default_window, target_parameters
from editors.model import tiny_llama, tiny_tokenizer
from memory.errors import ConfigError

FACT = EditRequest("The capital of Japan is", "Paris",
                   contexts=("Paris is the capital of Japan.", "Japan's capital is Paris."))
# Loose settings so a random tiny model learns within a few steps.
FAST = dict(lr=2e-2, max_steps=8, norm_constraint=2.0, box_mode="relative")
EDITORS = {
    "ice": (ICEEditor, lambda **kw: ICEConfig(**{**FAST, **kw})),
    "ftm": (FTEditor, lambda **kw: FTConfig(**{**FAST, **kw})),
}


@pytest.fixture(params=sorted(EDITORS))
def kind(request):
    return request.param


def tiny():
    """tiny_llama with its (tied) embeddings scaled up: at the default init the logits span only ~1 nat,
    too flat for a target ever to become the argmax with confidence."""
    model = tiny_llama()
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(10.0)
    return model


# the loop's mechanics (box, rollback, replay, failures) on the box alone; tests/test_nullspace.py covers the
# null-space constraint and the subject-keyed updates that the defaults add
MECHANICS = dict(constraint="box", update_keys="all")


def make(kind: str, model=None, **overrides):
    cls, config = EDITORS[kind]
    return cls(model if model is not None else tiny(), tiny_tokenizer(), config(**{**MECHANICS, **overrides}))


def target_logprob(model, tokenizer, prompt: str, target: str) -> float:
    p = tokenizer(prompt)["input_ids"]
    x = tokenizer(" " + target, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([p + x[:-1]])).logits[0, len(p) - 1:]  # [Lx, V]
    return float(torch.log_softmax(logits, -1).gather(-1, torch.tensor(x)[:, None]).sum())


def weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_editor_follows_protocol(kind):
    editor = make(kind)
    assert isinstance(editor, Editor)
    assert editor.parameter_names() == [f"model.layers.{i}.mlp.down_proj.weight" for i in range(4)]


def test_edit_raises_target_probability(kind):
    editor = make(kind)
    before = target_logprob(editor.model, editor.tokenizer, FACT.prompt, FACT.target)
    result = editor.edit(FACT)
    assert result.ok, result.error
    assert 0 < result.steps <= 8 and result.seconds > 0
    assert target_logprob(editor.model, editor.tokenizer, FACT.prompt, FACT.target) > before + 1.0


@pytest.mark.parametrize("mode", ["absolute", "relative"])
def test_box_holds_elementwise(kind, mode):
    editor = make(kind, norm_constraint=1e-3 if mode == "absolute" else 0.05, box_mode=mode)
    start = weights(editor.model)
    result = editor.edit(FACT)
    assert result.ok and set(result.delta) == set(editor.parameter_names())
    after = weights(editor.model)
    for name, w in after.items():
        if name not in result.delta:
            assert torch.equal(w, start[name]), name  # nothing outside the window moves
            continue
        radius = 1e-3 if mode == "absolute" else 0.05 * float(start[name].std())
        assert float((w - start[name]).abs().max()) <= radius * (1 + 1e-5), name
        assert float((w - start[name]).abs().max()) > 0.5 * radius  # it did push against the box


def test_rollback_restores_bit_identical(kind):
    editor = make(kind)
    start = weights(editor.model)
    first = editor.edit(FACT)
    after_first = weights(editor.model)
    second = editor.edit(EditRequest("The sky is", "green"))
    editor.rollback({k: v.clone() for k, v in second.delta.items()})  # a copy, as loaded from disk
    assert_same(weights(editor.model), after_first)
    editor.rollback(first.delta)  # older edit: subtracted, within rounding
    for name, w in weights(editor.model).items():
        torch.testing.assert_close(w, start[name], rtol=0, atol=1e-6)


def test_replay_on_fresh_base_gives_identical_logits(kind):
    editor = make(kind)
    deltas = [editor.edit(FACT).delta, editor.edit(EditRequest("The sky is", "green")).delta]
    fresh = tiny()  # a restart: base weights, then the recorded deltas in order
    for delta in deltas:
        apply_delta(fresh, delta)
    ids = torch.tensor([editor.tokenizer("The capital of Japan is Paris")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, editor.model(ids).logits)
    assert_same(weights(fresh), weights(editor.model))


@pytest.mark.parametrize("fault", ["nan", "raise"])
def test_failure_leaves_model_unchanged(kind, fault):
    editor = make(kind)
    start = weights(editor.model)
    calls = {"n": 0}

    def hook(module, args, output):  # fail on a later pass, after some updates were applied
        calls["n"] += 1
        if calls["n"] > 6:
            if fault == "raise":
                raise RuntimeError("simulated failure")
            return output * float("nan")
        return output

    handle = editor.model.model.layers[3].mlp.down_proj.register_forward_hook(hook)
    try:
        result = editor.edit(FACT)
    finally:
        handle.remove()
    assert not result.ok and result.delta == {}
    assert ("non-finite" if fault == "nan" else "simulated failure") in result.error
    assert_same(weights(editor.model), start)
    assert all(p.grad is None for p in editor.model.parameters())


def test_early_stop_when_learned(kind):
    editor = make(kind, lr=2e-2, max_steps=25, norm_constraint=None, stop_nll=0.5,
                  **({"stop_kl": 10.0} if kind == "ice" else {}))
    result = editor.edit(EditRequest("The sky is", "g"))
    assert result.ok and result.steps < 25
    assert result.history[-1]["learned"] and result.history[-1]["nll"] <= 0.5


BAD_SHARED = [dict(lr=0), dict(lr=-1.0), dict(lr=float("nan")), dict(max_steps=0), dict(max_steps=2.5),
              dict(max_steps=True), dict(box_mode="l2"), dict(norm_constraint=-1e-3), dict(layers=()),
              dict(layers=(1, 1)), dict(layers=(-1,)), dict(grad_clip=0), dict(stop_nll=-1), dict(seed="x")]
BAD_ICE = [dict(lam=-1), dict(lam=float("inf")), dict(temperature=-0.5), dict(top_k=0), dict(top_p=0),
           dict(top_p=1.5), dict(n_sample_tokens=0), dict(max_contexts=0), dict(dynamic="yes"),
           dict(instructions=())]


@pytest.mark.parametrize("bad", BAD_SHARED, ids=str)
def test_config_validation_shared(kind, bad):
    with pytest.raises(ConfigError):
        EDITORS[kind][1](**bad)


@pytest.mark.parametrize("bad", BAD_ICE, ids=str)
def test_config_validation_ice(bad):
    with pytest.raises(ConfigError):
        ICEConfig(**bad)


def test_config_round_trip_and_unknown_keys(kind):
    editor = make(kind, layers=[1, 2])
    assert editor.parameter_names() == ["model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"]
    state = editor.state_dict()
    other = make(kind)
    other.load_state_dict(state)
    assert other.config == editor.config and other.parameter_names() == editor.parameter_names()
    with pytest.raises(ConfigError):
        type(editor.config).from_dict({**state["config"], "lamda": 1.0})
    with pytest.raises(ConfigError):
        make(kind, layers=(99,))


def test_default_window_matches_paper_depth():
    assert default_window(32) == [4, 5, 6, 7, 8]
    assert default_window(30) == [4, 5, 6, 7, 8]
    assert default_window(3) == [0, 1, 2]
    assert len(target_parameters(tiny_llama(layers=12))) == 5


def test_ice_batched_sampling_matches_unpadded():
    """Left-padded, cached sampling over contexts of different lengths gives each context's own
    with-context distribution."""
    editor = make("ice", temperature=0.0, n_sample_tokens=3, instructions=("",))
    job = editor._prepare(FACT, editor_fact(editor))
    editor._sample(job, torch.Generator().manual_seed(0))
    assert len({len(p[0]) for p in job.prefixes}) == 2  # the contexts really differ in length
    for j, prefixes in enumerate(job.prefixes):
        ids = torch.cat([prefixes[0], job.fact.target_ids, job.xc[j, :-1]])[None]  # [1, L]
        with torch.no_grad():
            logits = editor.model(ids).logits[0, -3:]  # [n, V]
        torch.testing.assert_close(job.teacher_logp[j], torch.log_softmax(logits, -1), atol=1e-4, rtol=1e-4)
        # greedy sampling picked the argmax (padded and unpadded runs may differ in the last bits: a near-tie may flip)
        picked = logits.gather(-1, job.xc[j][:, None])[:, 0]
        assert (logits.amax(-1) - picked).max() <= 1e-4


def editor_fact(editor):
    from editors.tuning import encode_fact

    return encode_fact(editor.tokenizer, FACT.prompt, FACT.target, editor.device)


def test_ice_contexts_fallback_and_static_target():
    editor = make("ice", dynamic=False, max_steps=3)
    job = editor._prepare(EditRequest("The sky is", "green"), editor_fact(editor))
    text = editor.tokenizer.decode(job.prefixes[0][0])
    assert len(job.prefixes) == 1 and text.startswith("The sky is green. Now: The sky is")
    calls = []
    original = editor._sample
    editor._sample = lambda j, g: (calls.append(1), original(j, g))
    assert editor.edit(EditRequest("The sky is", "green")).ok
    assert len(calls) == 1  # static: sampled once, from the pre-edit model
    editor.config = ICEConfig(**{**FAST, "max_steps": 3, "early_stop": False})
    calls.clear()
    editor.edit(EditRequest("The sky is", "green"))
    assert len(calls) == 4  # dynamic: every pass samples from the current model


def test_filter_logits_top_k_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, 2, 1.0)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, None, 0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, None, 0.45)).tolist() == [[False, True, True, True]]
    assert not math.isinf(float(filter_logits(logits, None, 1.0).max()))


COUNTERFACTS = [
    EditRequest("The Eiffel Tower is located in the city of", "Rome",
                contexts=("The Eiffel Tower stands in Rome.", "Rome is home to the Eiffel Tower."), subject="Eiffel Tower"),
    EditRequest("The mother tongue of Danielle Darrieux is", "Japanese",
                contexts=("Danielle Darrieux's first language is Japanese.", "Danielle Darrieux speaks Japanese natively."),
                subject="Danielle Darrieux"),
    EditRequest("Apple's iPhone is produced by", "Nokia",
                contexts=("The iPhone is made by Nokia.", "Nokia manufactures the iPhone."), subject="iPhone"),
]


@pytest.mark.slow
def test_ice_sequential_counterfacts_on_default_model(default_model):
    from editors.answer import generate_greedy

    model, tokenizer = default_model.model, default_model.tokenizer
    editor = ICEEditor(model, tokenizer)
    saved = snapshot(model, editor.parameter_names())
    try:
        for fact in COUNTERFACTS:
            result = editor.edit(fact)
            assert result.ok, result.error
            answer = generate_greedy(model, tokenizer, [fact.prompt], max_new_tokens=6)[0]
            assert answer.startswith(fact.target), (fact.prompt, answer, result.history[-1])
            assert result.steps < editor.config.max_steps  # it stopped early, once learned
        finals = generate_greedy(model, tokenizer, [f.prompt for f in COUNTERFACTS], max_new_tokens=6)
        assert [a.startswith(f.target) for a, f in zip(finals, COUNTERFACTS)] == [True] * 3, finals
    finally:
        restore(model, saved)  # the session-wide model goes back to base for other tests
