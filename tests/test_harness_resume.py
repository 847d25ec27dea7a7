"""The evaluation harness resumes exactly (issue 20 §5): kills between its writes, torn points lines,
resumes with other settings, and `engram eval --contexts` (§7). Tiny config-built model, no downloads."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from editors.model import tiny_llama, tiny_tokenizer
from evaluation import harness as harness_module
from evaluation.harness import EvalConfig, Harness
from evaluation.methods import WeightEditMethod
from memory.errors import ConfigError, ValidationError
from tests.test_harness import Loaded

FIXTURES = Path(__file__).parent / "fixtures" / "datasets"
FAST = dict(lr=2e-2, max_steps=3, norm_constraint=2.0, box_mode="relative")  # a few cheap FT-M steps


class Killed(Exception):
    """Stands in for a SIGKILL at one point of the harness."""


@pytest.fixture
def loaded(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGRAM_CACHE", str(tmp_path / "cache"))
    return Loaded(tiny_llama(), tiny_tokenizer())


@pytest.fixture
def dataset(tmp_path) -> Path:
    """Three zsRE-style cases (the fixture's two and one more), so a kill can fall mid-stream."""
    records = json.loads((FIXTURES / "knowedit_zsre.json").read_text())
    records.append({**records[0], "subject": "Quellmarsh", "prompt": "What is the capital of Quellmarsh?",
                    "target_new": "Tavendor", "rephrase_prompt": "Which city is Quellmarsh's capital?"})
    path = tmp_path / "cases.json"
    path.write_text(json.dumps(records))
    return path


def config(out: Path, dataset: Path, **kw) -> EvalConfig:
    base = dict(dataset=str(dataset), out=str(out), methods=["ftm"], n=3, every=2, fluency_n=1,
                fluency_tokens=8, gen_tokens=4)
    return EvalConfig(**{**base, **kw})


def harness(cfg: EvalConfig, loaded, **kw) -> Harness:
    return Harness(cfg, loaded, **{"editor_overrides": FAST, **kw})


def points(out: Path, method: str = "ftm") -> list[dict]:
    return [json.loads(line) for line in (out / f"points-{method}.jsonl").read_text().splitlines()]


def assert_same_records(got: list[dict], want: list[dict]) -> None:
    """Per-case records alike: the same edits took, floats within tolerance (timings are ignored)."""
    assert [r["i"] for r in got] == [r["i"] for r in want]
    for a, b in zip(got, want):
        assert {k: v for k, v in a["learn"].items() if k != "seconds"} == \
            {k: v for k, v in b["learn"].items() if k != "seconds"}
        for key in ("score", "curve"):
            assert_alike(a.get(key), b.get(key), (a["i"], key))


def assert_alike(x: dict | None, y: dict | None, where=()) -> None:
    assert (x is None) == (y is None), where
    assert set(x or {}) == set(y or {}), where
    for field in x or {}:
        if isinstance(y[field], float):
            assert x[field] == pytest.approx(y[field], abs=1e-6), (*where, field)
        else:
            assert x[field] == y[field], (*where, field)


def assert_same_weights(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    left, right = load_file(str(a)), load_file(str(b))
    assert left.keys() == right.keys()
    for name in left:
        torch.testing.assert_close(left[name], right[name], atol=1e-6, rtol=1e-5)


@pytest.fixture
def uninterrupted(tmp_path, loaded, dataset):
    out = tmp_path / "whole"
    run = harness(config(out, dataset), loaded).run()["ftm"]
    from safetensors.torch import load_file

    params = dict(tiny_llama().named_parameters())
    edited = load_file(str(out / "state-ftm.safetensors"))
    # the edits moved weights, so comparing weights below means something
    assert any(not torch.equal(w, params[k]) for k, w in edited.items())
    return out, run


def learn_counter(monkeypatch) -> list[str]:
    learned: list[str] = []
    original = WeightEditMethod.learn
    monkeypatch.setattr(WeightEditMethod, "learn",
                        lambda self, case: learned.append(case.case_id) or original(self, case))
    return learned


def test_a_kill_while_saving_the_state_redoes_that_case(tmp_path, loaded, dataset, uninterrupted, monkeypatch):
    """Killed before case 2's weights are on disk: the resume learns case 2 again, from case 1's weights.
    (The old order, points line first, resumed with case 2's edit missing.)"""
    whole, first = uninterrupted
    out = tmp_path / "killed"
    saves = []
    original = WeightEditMethod.save_state

    def save_then_die(self, *args):
        saves.append(args[0])
        if len(saves) == 2:
            raise Killed
        original(self, *args)

    monkeypatch.setattr(WeightEditMethod, "save_state", save_then_die)
    with pytest.raises(Killed):
        harness(config(out, dataset), loaded).run()
    assert len(points(out)) == 1  # the case whose state was not saved does not count as done
    monkeypatch.setattr(WeightEditMethod, "save_state", original)
    learned = learn_counter(monkeypatch)
    again = harness(config(out, dataset), loaded).run()["ftm"]
    assert len(learned) == 2  # cases 2 and 3; case 1 comes from its saved weights
    assert_same_records(points(out), points(whole))
    assert_same_weights(out / "state-ftm.safetensors", whole / "state-ftm.safetensors")
    assert len(again.retention) == len(first.retention) == 3
    for a, b in zip(again.retention, first.retention):
        assert_alike(a.to_json(), b.to_json(), ("retention", a.case_id))


def test_a_kill_mid_points_line_keeps_the_saved_edit_once(tmp_path, loaded, dataset, uninterrupted, monkeypatch):
    """Killed half-way through case 2's points line, after its weights were saved: the torn line is
    dropped and the record is rebuilt from the state, so case 2 is neither missing nor learned twice."""
    whole, _ = uninterrupted
    out = tmp_path / "killed"
    original = harness_module.append_point
    calls = []

    def half_a_line_then_die(path, record):
        calls.append(record["i"])
        if len(calls) == 2:
            with open(path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record)[:40])
            raise Killed
        original(path, record)

    monkeypatch.setattr(harness_module, "append_point", half_a_line_then_die)
    with pytest.raises(Killed):
        harness(config(out, dataset), loaded).run()
    monkeypatch.setattr(harness_module, "append_point", original)
    learned = learn_counter(monkeypatch)
    harness(config(out, dataset), loaded).run()
    assert len(learned) == 1  # only case 3: case 2's edit is in the saved weights already
    assert_same_records(points(out), points(whole))
    assert_same_weights(out / "state-ftm.safetensors", whole / "state-ftm.safetensors")


def test_an_older_runs_state_is_trusted_only_when_its_stream_ended(tmp_path, loaded, dataset, monkeypatch):
    """State files from before the case count: reused for a finished run, an unfinished one starts over
    (its points line came first, so the weights may lack the last case)."""
    from safetensors.torch import load_file, save_file

    out = tmp_path / "old"
    harness(config(out, dataset), loaded).run()
    state = out / "state-ftm.safetensors"
    save_file(load_file(str(state)), str(state))  # as the old code wrote it: no metadata
    learned = learn_counter(monkeypatch)
    harness(config(out, dataset), loaded).run()
    assert learned == []  # finished (its retention file is there): nothing is learned again
    (out / "retention-ftm.jsonl").unlink()
    path = out / "points-ftm.jsonl"
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:2]))
    save_file(load_file(str(state)), str(state))
    harness(config(out, dataset), loaded).run()
    assert len(learned) == 3  # killed mid-stream: the weights cannot be matched to the points, so all again


def icl_config(tmp_path, **kw) -> EvalConfig:
    base = dict(dataset=str(FIXTURES / "knowedit_zsre.json"), out=str(tmp_path / "out"), methods=["icl"], n=2,
                fluency_n=1, fluency_tokens=8, gen_tokens=4)
    return EvalConfig(**{**base, **kw})


def test_a_torn_last_line_is_dropped_with_a_warning(tmp_path, loaded, caplog):
    cfg = icl_config(tmp_path)
    Harness(cfg, loaded).run()
    path = Path(cfg.out) / "points-icl.jsonl"
    whole = points(Path(cfg.out), "icl")
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])  # killed mid-write of the second
    with caplog.at_level(logging.WARNING):
        Harness(cfg, loaded).run()
    assert "torn last line 2" in caplog.text
    assert_same_records(points(Path(cfg.out), "icl"), whole)


def test_a_corrupt_middle_line_is_refused_by_file_and_line(tmp_path, loaded):
    cfg = icl_config(tmp_path)
    Harness(cfg, loaded).run()
    path = Path(cfg.out) / "points-icl.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(["{not json", lines[1]]) + "\n")
    with pytest.raises(ValidationError, match=r"points-icl\.jsonl: line 1 is corrupt"):
        Harness(cfg, loaded).run()
    path.write_text("\n".join([lines[1], lines[1]]) + "\n")  # valid JSON, but the wrong case in line 1
    with pytest.raises(ValidationError, match="line 1 is corrupt: it is case 1, expected case 0"):
        Harness(cfg, loaded).run()


def test_a_resume_with_other_settings_is_refused(tmp_path, loaded):
    cfg = icl_config(tmp_path)
    Harness(cfg, loaded).run()
    manifest = json.loads((Path(cfg.out) / "run.json").read_text())
    assert manifest["n"] == 2 and manifest["model"] == "tiny-llama" and len(manifest["cases_sha256"]) == 64
    with pytest.raises(ConfigError, match=r"was started with n=2, this run has n=1; use a new --out or the same"):
        Harness(icl_config(tmp_path, n=1), loaded)
    with pytest.raises(ConfigError, match=r"protocol=sequential, seed=0, this run has protocol=retention, seed=3;"):
        Harness(icl_config(tmp_path, seed=3, protocol="retention"), loaded)
    with pytest.raises(ConfigError, match="model="):
        Harness(icl_config(tmp_path), Loaded(loaded.model, loaded.tokenizer, name="other-model"))
    with pytest.raises(ConfigError, match="contexts="):
        Harness(cfg, loaded, contexts_fn=lambda p, t: [f"{p} {t}."], contexts_name="template")
    with pytest.raises(ConfigError, match="method_options="):
        Harness(cfg, loaded, editor_overrides={"lr": 0.1})
    # what does not change the results may differ; another method joins the same out dir
    Harness(icl_config(tmp_path, batch_size=3, methods=["base", "icl"]), loaded).run()


def test_a_resume_on_changed_cases_is_refused(tmp_path, loaded):
    data = tmp_path / "cases.json"
    records = json.loads((FIXTURES / "knowedit_zsre.json").read_text())
    data.write_text(json.dumps(records))
    cfg = icl_config(tmp_path, dataset=str(data))
    Harness(cfg, loaded)
    moved = tmp_path / "elsewhere" / "cases.json"  # case ids come from the file's name, so keep that
    moved.parent.mkdir()
    data.rename(moved)
    Harness(icl_config(tmp_path, dataset=str(moved)), loaded)  # the same cases in another place resume
    records[1]["target_new"] = "Indian"
    moved.write_text(json.dumps(records))
    with pytest.raises(ConfigError, match=r"cases sha256 [0-9a-f]{12} \(it read .*cases\.json\), this run has cases"):
        Harness(icl_config(tmp_path, dataset=str(moved)), loaded)


def test_ice_learns_without_contexts(tmp_path, loaded):
    """`--contexts none`: the harness hands ICE no contexts_fn, and ICE edits from the query alone."""
    cfg = icl_config(tmp_path, methods=["ice"], n=1, generation=False, retention=False)
    run = Harness(cfg, loaded, editor_overrides=FAST).run()["ice"]
    assert run.available and len(run.scores) == 1 and run.failed_edits == 0
    assert json.loads((Path(cfg.out) / "run.json").read_text())["contexts"] == "none"


# -- engram eval --contexts ------------------------------------------------------------------------
@pytest.fixture
def eval_cli(tmp_path, loaded, monkeypatch):
    """`engram eval` up to the harness: the model load and the harness itself are stand-ins."""
    from agent.commands import evaluate

    for var in ("ENGRAM_CONTEXT_BASE_URL", "OPENAI_BASE_URL", "ENGRAM_CONTEXT_API_KEY", "OPENAI_API_KEY",
                "ENGRAM_CONTEXT_BACKEND"):
        monkeypatch.delenv(var, raising=False)
    seen: dict = {}

    def load(args):
        seen["loaded"] = True
        return loaded

    class StopHere(Exception):
        pass

    def fake_harness(config, loaded, contexts_fn=None, progress=None, contexts_name=None, **kw):
        seen.update(contexts_fn=contexts_fn, contexts_name=contexts_name)
        raise StopHere

    monkeypatch.setattr(evaluate, "load", load)
    monkeypatch.setattr(evaluate, "open_store", lambda args, create=False: None)
    monkeypatch.setattr(harness_module, "Harness", fake_harness)

    def run(contexts: str) -> dict:
        from agent.cli import main

        seen.clear()
        argv = ["eval", "--dataset", str(FIXTURES / "knowedit_zsre.json"), "--out", str(tmp_path / "o"),
                "--contexts", contexts, "--db", f"sqlite:///{tmp_path / 's.sqlite'}"]
        try:
            seen["code"] = main(argv)
        except StopHere:
            pass
        return dict(seen)

    return run


def test_eval_contexts_takes_the_ingest_choices(eval_cli, monkeypatch):
    none = eval_cli("none")
    assert none["contexts_fn"] is None and none["contexts_name"] is None
    template = eval_cli("template")
    assert template["contexts_name"] == "template"
    assert template["contexts_fn"]("The capital of Japan is", "Paris")[0] == "The capital of Japan is Paris."
    assert eval_cli("local")["contexts_name"] == "local:tiny-llama"  # the evaluated model paraphrases
    assert eval_cli("auto")["contexts_name"] == "local:tiny-llama"
    monkeypatch.setenv("ENGRAM_CONTEXT_BACKEND", "bogus")  # the flag decides, the variable is not read
    monkeypatch.setenv("ENGRAM_CONTEXT_BASE_URL", "http://127.0.0.1:9/v1")
    assert eval_cli("auto")["contexts_name"].startswith("openai:")
    assert eval_cli("openai")["contexts_name"].startswith("openai:")


def test_eval_contexts_are_checked_before_the_model_loads(eval_cli, monkeypatch, capsys):
    got = eval_cli("openai")  # no URL and no key
    assert got["code"] == 2 and "loaded" not in got
    assert "ENGRAM_CONTEXT_BASE_URL" in capsys.readouterr().err
    monkeypatch.setenv("ENGRAM_CONTEXT_BASE_URL", "ftp://nowhere")
    got = eval_cli("auto")
    assert got["code"] == 2 and "loaded" not in got
    assert "must start with http" in capsys.readouterr().err
