"""The null-space constraint of the weight editors (editors/nullspace.py) on a tiny model."""
from __future__ import annotations

import pytest
import torch

from editors.base import EditRequest
from editors.ft import FTConfig, FTEditor
from editors.ice import ICEConfig, ICEEditor
from editors.model import tiny_tokenizer
from editors.nullspace import (SEED_PROMPTS, Preserved, StatsConfig, general_text, load_or_collect, null_basis,
                               project, remove_directions, second_moments)
from memory.errors import ConfigError
from tests.test_editors import target_logprob, tiny

FACTS = [("Alpha lives in", "Rome"), ("Beta works for", "Acme"), ("Gamma plays the", "harp")]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGRAM_CACHE", str(tmp_path / "cache"))


def constrained(cls=FTEditor, config=FTConfig, model=None, **overrides):
    settings = {"constraint": "nullspace", "update_keys": "all", "nullspace_energy": 0.2, "lr": 0.05,
                "norm_constraint": None, "max_steps": 40, **overrides}
    return cls(model if model is not None else tiny(), tiny_tokenizer(), config(**settings))


def test_the_projector_is_an_orthogonal_projection_onto_the_least_used_directions():
    keys = torch.randn(4000, 16) * torch.linspace(0.01, 3.0, 16)  # direction i has spread ~ i
    moment = keys.T @ keys / len(keys)
    basis = null_basis(moment, 0.01)
    assert torch.allclose(basis.T @ basis, torch.eye(basis.shape[1]), atol=1e-5)  # orthonormal
    p = basis @ basis.T
    free = basis.shape[1]
    assert 1 <= free < 16
    share = float(((keys @ p) ** 2).sum() / (keys ** 2).sum())  # the energy the free directions carry
    assert share <= 0.011
    assert float(p[0, 0]) > 0.99 and float(p[-1, -1]) < 1e-3  # the least-used axis is free, the most-used not


def test_removing_keys_keeps_their_outputs_and_stops_at_the_floor():
    torch.manual_seed(0)
    keys = torch.randn(3, 8)
    smaller = remove_directions(torch.eye(8), keys)
    assert smaller.shape == (8, 5) and torch.allclose(smaller.T @ smaller, torch.eye(5), atol=1e-5)
    assert torch.allclose(keys @ smaller, torch.zeros(3, 5), atol=1e-5)
    delta = torch.randn(4, 8)  # [out, in]: projected, it moves no output on the keys
    assert torch.allclose(project(delta, smaller) @ keys.T, torch.zeros(4, 3), atol=1e-5)
    assert torch.allclose(project(delta.T, smaller).T, project(delta, smaller), atol=1e-6)  # Conv1D layout
    preserved = Preserved({"w": torch.eye(8)}, min_free=0.5)
    preserved.projector()
    for i in range(6):
        preserved.add(i, {"w": torch.randn(1, 8)})
    assert preserved.free_dims()["w"] == 4  # two more keys would go below half of the 8 free directions
    preserved.keep_only([0])
    assert preserved.free_dims()["w"] == 7


def test_statistics_cover_real_tokens_only_and_are_cached(monkeypatch):
    model, tokenizer = tiny(), tiny_tokenizer()
    names = FTEditor(model, tokenizer, FTConfig()).parameter_names()
    cfg = StatsConfig(n_texts=8, text_tokens=12, batch=4)
    texts = general_text(model, tokenizer, cfg)
    longest_start = max(len(tokenizer(s)["input_ids"]) for s in SEED_PROMPTS)
    assert len(texts) == 8 and all(1 < len(t) <= longest_start + 12 for t in texts)
    moments, count = second_moments(model, texts, names, batch=3)
    assert count == sum(len(t) for t in texts)
    alone, _ = second_moments(model, texts[:1], names)
    padded, _ = second_moments(model, [texts[0], torch.cat([texts[0], texts[0]])], names)  # padding ignored
    for n in names:
        assert moments[n].shape == (128, 128) and torch.allclose(moments[n], moments[n].T)
        assert torch.allclose(alone[n], second_moments(model, texts[:1], names, batch=1)[0][n])
        assert padded[n].shape == alone[n].shape
    first = load_or_collect(model, tokenizer, names, cfg)
    monkeypatch.setattr("editors.nullspace.general_text", lambda *a: pytest.fail("the cache was not used"))
    again = load_or_collect(model, tokenizer, names, cfg)
    assert all(torch.equal(first[n], again[n]) for n in names)


@pytest.mark.parametrize("cls,config", [(FTEditor, FTConfig), (ICEEditor, ICEConfig)])
def test_an_edit_moves_the_weights_only_in_the_null_space(cls, config):
    editor = constrained(cls, config)
    model, tokenizer = editor.model, editor.tokenizer
    before = target_logprob(model, tokenizer, *FACTS[0])
    result = editor.edit(EditRequest(*FACTS[0], fact_id=1))
    assert result.ok and target_logprob(model, tokenizer, *FACTS[0]) > before + 1.0
    bases = editor._preserved.base
    for name, delta in result.delta.items():
        off = delta - project(delta, bases[name])
        assert float(off.norm()) <= 1e-4 * max(1.0, float(delta.norm())), name


def test_a_later_edit_leaves_the_outputs_on_an_earlier_edits_keys():
    editor = constrained()
    editor.edit(EditRequest(*FACTS[0], fact_id=1))
    keys = editor._preserved.edit_keys[1]
    result = editor.edit(EditRequest(*FACTS[1], fact_id=2))
    assert result.ok
    for name, delta in result.delta.items():
        moved = keys[name] @ delta.T  # [n, out]: the change of this matrix's output on the earlier keys
        assert float(moved.abs().max()) < 1e-4 * max(1.0, float(delta.abs().max())), name


def test_rollback_and_preserve_keep_the_key_set_in_step_with_the_applied_edits():
    editor = constrained()
    first = editor.edit(EditRequest(*FACTS[0], fact_id=1))
    second = editor.edit(EditRequest(*FACTS[1], fact_id=2))
    assert set(editor._preserved.edit_keys) == {1, 2}
    editor.rollback(second.delta)
    assert set(editor._preserved.edit_keys) == {1}
    fresh = constrained(model=editor.model)  # as after a restart: the applied edits' keys are recomputed
    fresh.preserve([EditRequest(*FACTS[0], fact_id=1), EditRequest(*FACTS[2], fact_id=3)])
    assert set(fresh._preserved.edit_keys) == {1, 3}
    fresh.preserve([EditRequest(*FACTS[2], fact_id=3)])
    assert set(fresh._preserved.edit_keys) == {3}
    assert first.ok


@pytest.mark.parametrize("bad", [{"constraint": "cone"}, {"nullspace_energy": 0}, {"nullspace_energy": 1.5},
                                 {"grow_preserved": "yes"}])
def test_bad_constraint_settings_are_refused(bad):
    with pytest.raises(ConfigError):
        FTConfig(**bad)


def test_preservation_prompts_are_written_from_the_fact_alone():
    from editors.preservation import preservation_prompts

    prompts = preservation_prompts("The mother tongue of Danielle Darrieux is", "Danielle Darrieux")
    same_relation, other_relations = prompts[:2], prompts[2:]
    assert all(p.startswith("The mother tongue of ") and "Darrieux" not in p for p in same_relation)
    assert all("Danielle Darrieux" in p and "mother tongue" not in p for p in other_relations)
    assert prompts == preservation_prompts("The mother tongue of Danielle Darrieux is", "Danielle Darrieux")
    assert preservation_prompts("The capital of Zorbia is", None) == []
    assert preservation_prompts("The capital of Zorbia is", "Quellmarsh") == []  # subject not in the prompt
    capital = preservation_prompts("The capital of France is", "France", n_each=8)
    assert "The capital of France is" not in capital and all("France" != p for p in capital)


def test_the_preservation_term_holds_the_other_prompts_closer_to_the_pre_edit_model():
    from editors.preservation import kl_term, prepare, preservation_prompts

    drift = {}
    for lam in (0.0, 5.0):
        model = tiny()
        editor = FTEditor(model, tiny_tokenizer(), FTConfig(lr=0.05, norm_constraint=None, max_steps=30,
                                                            preserve_lam=lam, early_stop=False,
                                                            constraint="box", update_keys="all"))
        request = EditRequest("The home of Alpha is", "Rome", subject="Alpha")
        job = prepare(model, editor.tokenizer, preservation_prompts(request.prompt, request.subject), "cpu")
        result = editor.edit(request)
        assert result.ok and (lam == 0 or all(h["keep_kl"] is not None for h in result.history))
        with torch.no_grad():
            drift[lam] = float(kl_term(model, job))
    assert drift[5.0] < 0.5 * drift[0.0]


def test_the_subject_position_is_the_last_token_of_its_first_mention():
    from editors.constraints import subject_position

    tokenizer = tiny_tokenizer()  # one token per character (after the BOS, if any)
    ids = tokenizer("Alpha lives in")["input_ids"]
    position = subject_position(tokenizer, "Alpha lives in", "Alpha")
    assert tokenizer.decode(ids[: position + 1]).replace(" ", "").endswith("Alpha")
    assert subject_position(tokenizer, "Alpha lives in", "Omega") is None
    assert subject_position(tokenizer, "Alpha lives in", None) is None


def test_a_subject_keyed_edit_moves_each_matrix_along_one_free_direction_only():
    editor = constrained(update_keys="subject")
    result = editor.edit(EditRequest("Alpha lives in", "Rome", fact_id=1, subject="Alpha"))
    assert result.ok
    for name, delta in result.delta.items():
        singular = torch.linalg.svdvals(delta)
        assert float(singular[1]) < 1e-4 * float(singular[0]), name  # rank 1: one input direction
        off = delta - project(delta, editor._preserved.base[name])
        assert float(off.norm()) <= 1e-4 * float(delta.norm()), name  # and that direction is a free one


def test_a_later_subject_keyed_edit_leaves_the_earlier_subjects_key_alone():
    editor = constrained(update_keys="subject")
    editor.edit(EditRequest("Alpha lives in", "Rome", fact_id=1, subject="Alpha"))
    keys = editor._preserved.edit_keys[1]  # the subject's key first, then the target positions'
    result = editor.edit(EditRequest("Beta works for", "Acme", fact_id=2, subject="Beta"))
    assert result.ok
    for name, delta in result.delta.items():
        moved = keys[name] @ delta.T
        assert float(moved.abs().max()) < 1e-4 * max(1.0, float(delta.abs().max())), name
