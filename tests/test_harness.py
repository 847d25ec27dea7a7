"""The evaluation harness end to end on a tiny config-built model and the project's own fixtures."""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from editors.model import tiny_llama, tiny_tokenizer
from evaluation.harness import EvalConfig, Harness
from evaluation.report import write_all
from memory.embeddings import HashEmbedder
from memory.errors import ConfigError

FIXTURES = Path(__file__).parent / "fixtures" / "datasets"


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    name: str = "tiny-llama"


@pytest.fixture
def loaded(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGRAM_CACHE", str(tmp_path / "cache"))
    model = tiny_llama()
    model.config.max_position_embeddings = 256
    return Loaded(model, tiny_tokenizer())


def config(tmp_path, **kw):
    base = dict(dataset=str(FIXTURES / "knowedit_zsre.json"), out=str(tmp_path / "out"), methods=["base", "icl", "rag", "gist"],
                n=2, every=1, fluency_n=1, fluency_tokens=8, gen_tokens=4)
    return EvalConfig(**{**base, **kw})


def test_sequential_run_writes_every_output(tmp_path, loaded, store):
    cfg = config(tmp_path)
    harness = Harness(cfg, loaded, embedder=HashEmbedder(32))
    runs = harness.run()
    results = write_all(Path(cfg.out), cfg, loaded, runs, 1.0, store)
    saved = json.loads((Path(cfg.out) / "results.json").read_text())
    assert saved["protocol"] == "sequential" and saved["n_edits"] == 2
    assert set(saved["methods"]) == {"base", "icl", "rag", "gist"}
    assert saved["methods"]["gist"]["available"] is False and saved["methods"]["gist"]["edit_success"] is None
    assert "no trained gist add-on" in saved["methods"]["gist"]["reason"]
    for name in ("base", "icl", "rag"):
        summary = saved["methods"][name]
        for key in ("edit_success", "rephrase", "portability", "locality", "edit_success_gen", "portability_gen"):
            assert summary[key] is not None and 0.0 <= summary[key] <= 1.0, (name, key)
        assert summary["fluency"] is not None and summary["pplr"] is not None
    # the base model learns nothing, so its locality against itself is exactly 1
    assert saved["methods"]["base"]["locality"] == 1.0
    rows = list(csv.DictReader(open(Path(cfg.out) / "curve.csv")))
    assert [r["n_edits"] for r in rows if r["method"] == "icl"] == ["1", "2"]
    assert (Path(cfg.out) / "plot-edit_success.png").stat().st_size > 1000
    assert "unavailable" in (Path(cfg.out) / "report.html").read_text()
    from memory.models import EvalPoint

    with store.transaction() as s:
        assert s.query(EvalPoint).filter_by(run_id=results["eval_run_id"], method="icl").count() > 0


def test_icl_prompt_carries_the_learned_facts(tmp_path, loaded):
    from evaluation.methods import ICLMethod

    harness = Harness(config(tmp_path), loaded)
    icl = ICLMethod(loaded.model, loaded.tokenizer)
    icl.learn(harness.cases[0])
    prompt = icl.prompts(["The currency of Glorbania is"])[0]
    assert harness.cases[0].target in prompt and prompt.endswith("The currency of Glorbania is")
    icl.reset()
    assert icl.prompts(["q"]) == ["q"]


def test_a_killed_run_resumes_where_it_stopped(tmp_path, loaded, monkeypatch):
    cfg = config(tmp_path, methods=["icl"], every=None)
    first = Harness(cfg, loaded).run()["icl"]
    points = Path(cfg.out) / "points-icl.jsonl"
    lines = points.read_text().splitlines()
    points.write_text(lines[0] + "\n")  # as if killed after the first case
    from evaluation.methods import ICLMethod

    learned = []
    original = ICLMethod.learn
    monkeypatch.setattr(ICLMethod, "learn", lambda self, case: learned.append(case.case_id) or original(self, case))
    again = Harness(cfg, loaded).run()["icl"]
    # case 1 is replayed into the fact list (not re-measured), case 2 is learned and measured anew
    assert len(again.scores) == 2
    assert [s.edit_success for s in again.scores] == [s.edit_success for s in first.scores]


def test_a_finished_run_reuses_its_retention_scores(tmp_path, loaded, monkeypatch):
    cfg = config(tmp_path, methods=["icl"], every=None)
    first = Harness(cfg, loaded).run()["icl"]
    assert (Path(cfg.out) / "retention-icl.jsonl").exists()
    from evaluation.measure import Scorer

    monkeypatch.setattr(Scorer, "score", lambda *a, **k: pytest.fail("a finished run must not measure again"))
    again = Harness(cfg, loaded).run()["icl"]
    assert [s.to_json() for s in again.retention] == [s.to_json() for s in first.retention]


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(ConfigError):
        config(tmp_path, protocol="random")
    with pytest.raises(ConfigError):
        config(tmp_path, methods=["magic"])


def test_gist_route_runs_through_the_harness(tmp_path, loaded):
    """An untrained add-on on the tiny model: proves the plumbing (pool grows, is read, is emptied), not quality."""
    from editors.incomes import GistAddon, GistConfig

    addon = GistAddon.for_model(loaded.model, GistConfig())
    cfg = config(tmp_path, methods=["base", "gist"], protocol="single", every=None)
    runs = Harness(cfg, loaded, gist_addon=addon).run()
    gist, base = runs["gist"], runs["base"]
    assert gist.available and len(gist.scores) == 2
    # the pool is emptied after each single-case measurement and detached at the end: base logits are back
    assert not addon.attached
    ids = torch.tensor([[5, 6, 7]])
    assert torch.equal(loaded.model(ids).logits, tiny_llama()(ids).logits)
    assert [s.case_id for s in gist.scores] == [s.case_id for s in base.scores]


def test_eval_reads_a_gist_addon_from_a_directory(tmp_path, loaded):
    """`engram eval --gist-addon DIR`: a freshly trained add-on is evaluated without replacing the shipped one."""
    import json

    from editors.incomes import GistAddon, GistConfig

    GistAddon.for_model(loaded.model, GistConfig(gate_init=1.0, zero_key_init_std=0.1)).save(tmp_path / "addon")
    cfg = config(tmp_path, methods=["gist"], protocol="retention", every=None, generation=False,
                 gist_addon=str(tmp_path / "addon"))
    runs = Harness(cfg, loaded).run()
    assert runs["gist"].available and len(runs["gist"].retention) == 2
    from evaluation.report import write_all

    results = write_all(Path(cfg.out), cfg, loaded, runs, 1.0, None)
    assert json.loads((Path(cfg.out) / "results.json").read_text())["settings"]["gist_addon"] == str(tmp_path / "addon")
    assert results["settings"]["gist_addon"] == str(tmp_path / "addon")
    missing = config(tmp_path / "x", methods=["gist"], protocol="single", every=None,
                     gist_addon=str(tmp_path / "nowhere"))
    gone = Harness(missing, loaded).run()["gist"]
    assert not gone.available and "nowhere" in gone.reason


def test_gated_and_ungated_gist_and_teacher_forced_only_runs(tmp_path, loaded):
    from editors.incomes import GistAddon, GistConfig

    addon = GistAddon.for_model(loaded.model, GistConfig(gate_init=1.0, zero_key_init_std=0.1))
    cfg = config(tmp_path, methods=["gist", "gist-ungated"], protocol="retention", every=None, generation=False,
                 measure_n=1)
    runs = Harness(cfg, loaded, gist_addon=addon).run()
    for name in ("gist", "gist-ungated"):
        assert runs[name].available and len(runs[name].retention) == 1  # both learned, the first measured
        assert all(s.edit_success is not None and s.edit_success_gen is None for s in runs[name].retention)
    assert not addon.attached


def test_offset_takes_a_later_slice_of_the_file(tmp_path, loaded):
    from evaluation.datasets import load_dataset

    every = [c.case_id for c in load_dataset(FIXTURES / "knowedit_zsre.json") if c.editable]
    later = Harness(config(tmp_path, methods=["base"], n=1, offset=1), loaded)
    assert [c.case_id for c in later.cases] == every[1:2]
    with pytest.raises(ConfigError, match="no editable cases after the first 99"):
        Harness(config(tmp_path / "far", methods=["base"], offset=99), loaded)
    with pytest.raises(ConfigError, match="--offset"):
        config(tmp_path, offset=-1)
