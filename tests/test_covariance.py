"""The covariance constraint of the weight editors (editors/covariance.py) on a tiny model."""
from __future__ import annotations

import pytest
import torch

from editors.base import EditRequest
from editors.covariance import KeptKeys, whitener
from editors.ft import FTConfig, FTEditor
from editors.ice import ICEConfig, ICEEditor
from memory.errors import ConfigError
from tests.test_nullspace import constrained


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGRAM_CACHE", str(tmp_path / "cache"))


def test_the_whitener_inverts_the_ridged_moment():
    keys = torch.randn(2000, 12) * torch.linspace(0.05, 2.0, 12)
    moment = keys.T @ keys / len(keys)
    ridge = 0.1
    shifted = moment + ridge * moment.trace() / 12 * torch.eye(12)
    assert torch.allclose(whitener(moment, ridge) @ shifted, torch.eye(12), atol=1e-4)


def test_kept_keys_block_their_directions_until_the_floor_and_let_go_on_rollback():
    torch.manual_seed(0)
    kept = KeptKeys({"w": 8}, {"w": torch.eye(8)}, min_free=0.5)
    first = torch.randn(2, 8)
    kept.add(1, {"w": first})
    assert torch.allclose(kept.free_part("w", first.T), torch.zeros(8, 2), atol=1e-5)
    delta = torch.randn(3, 8)  # [out, in]: projected, it moves no output on the kept keys
    assert torch.allclose(kept.project_update("w", delta) @ first.T, torch.zeros(3, 2), atol=1e-5)
    assert torch.allclose(kept.project_update("w", delta.T).T, kept.project_update("w", delta), atol=1e-6)
    kept.add(2, {"w": torch.randn(2, 8)})
    assert kept.free_dims()["w"] == 4
    kept.add(3, {"w": torch.randn(1, 8)})  # would leave 3 of 8: below half, so it is not kept exactly
    assert kept.free_dims()["w"] == 4
    kept.keep_only([2])
    assert kept.free_dims()["w"] == 6


def test_the_subject_direction_is_the_whitened_key():
    kept = KeptKeys({"w": 4}, {"w": torch.diag(torch.tensor([1.0, 2.0, 4.0, 8.0]))})
    key = torch.ones(4)
    assert torch.allclose(kept.direction("w", key), torch.tensor([1.0, 2.0, 4.0, 8.0]))


@pytest.mark.parametrize("cls,config", [(FTEditor, FTConfig), (ICEEditor, ICEConfig)])
def test_a_covariance_edit_is_rank_one_along_the_whitened_subject_key(cls, config):
    editor = constrained(cls, config, constraint="covariance", update_keys="subject")
    result = editor.edit(EditRequest("Alpha lives in", "Rome", fact_id=1, subject="Alpha"))
    assert result.ok
    from editors.constraints import subject_position
    from editors.nullspace import edit_keys

    ids = torch.tensor(editor.tokenizer("Alpha lives in")["input_ids"])
    at = subject_position(editor.tokenizer, "Alpha lives in", "Alpha")
    keys = edit_keys(editor.model, ids, [at], editor.parameter_names())  # after the edit: same for earlier layers
    for name, delta in result.delta.items():
        singular = torch.linalg.svdvals(delta)
        assert float(singular[1]) < 1e-4 * float(singular[0]), name
        _, _, vh = torch.linalg.svd(delta)
        first = editor.parameter_names()[0]
        if name == first:  # the first edited matrix's input does not depend on the edit
            u = editor._preserved.whiten[name] @ keys[name][0]
            assert abs(float(torch.nn.functional.cosine_similarity(vh[0], u, dim=0))) > 0.999


def test_a_later_covariance_edit_leaves_the_outputs_on_an_earlier_edits_keys():
    editor = constrained(constraint="covariance", update_keys="subject")
    editor.edit(EditRequest("Alpha lives in", "Rome", fact_id=1, subject="Alpha"))
    keys = editor._preserved.edit_keys[1]
    result = editor.edit(EditRequest("Beta works for", "Acme", fact_id=2, subject="Beta"))
    assert result.ok
    for name, delta in result.delta.items():
        moved = keys[name] @ delta.T  # [n, out]
        assert float(moved.abs().max()) < 1e-4 * max(1.0, float(delta.abs().max())), name


@pytest.mark.parametrize("bad", [{"covariance_ridge": 0}, {"covariance_ridge": -1.0}, {"covariance_ridge": "a"}])
def test_bad_covariance_settings_are_refused(bad):
    with pytest.raises(ConfigError):
        FTConfig(**bad)
