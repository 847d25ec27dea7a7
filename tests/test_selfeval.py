"""Periodic self-evaluation (issue 22 item 5): points every N applied facts in one reused "agent" eval run,
base answers cached once per model, locality against them, a seeded retention sample, and `engram report`.
Tiny config-built models and a cheap deterministic editor; one slow test times the real default model."""
from __future__ import annotations

import contextlib
import json
import time

import pytest
import torch
from sqlalchemy import func, select

from agent.selfeval import SelfEvalConfig, SelfEvaluator
from agent.selfeval.evaluator import RUN_KEY
from agent.selfeval.probes import DEFAULT_PROBES, cache_path, load_probes
from editors.base import EditResult, finalize_delta, snapshot
from editors.model import tiny_llama, tiny_tokenizer
from editors.state import ModelState
from memory.errors import ConfigError
from memory.facts import FactInput
from memory.models import Edit, EvalPoint, EvalRun, Fact

NAMES = ["model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"]
TINY = dict(sample=4, fluency_n=1, fluency_tokens=8, gen_tokens=4, locality_tokens=3)


class NoiseEditor:
    """A deterministic stand-in editor that adds large noise to two MLP matrices: it changes the model's
    answers everywhere, the worst locality an edit can have."""

    name = "noise"

    def __init__(self, model, scale: float = 0.5):
        self.model, self.scale = model, scale

    def parameter_names(self):
        return list(NAMES)

    def edit(self, request) -> EditResult:
        before = snapshot(self.model, NAMES)
        gen = torch.Generator().manual_seed(sum(map(ord, request.target)))
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name in NAMES:
                params[name].add_(self.scale * torch.randn(params[name].shape, generator=gen))
        return EditResult(steps=1, loss=0.5, seconds=0.0, delta=finalize_delta(self.model, before))


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: these models are small, and on a busy machine two threads spin and wait on each
    other (one self-evaluation of the tiny model: 5 s with two threads, 0.16 s with one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny():
    return tiny_llama(), tiny_tokenizer()


def learned(store, n: int, backend: str = "gist", **fields) -> list[int]:
    """n facts with an applied edit row (a gist row: the weights stay as they are)."""
    start = sum(store.counts()["facts"].values())  # distinct prompts: no fact supersedes another
    ids = store.add_facts([FactInput(prompt=f"Item {start + i} is", target=f"t{start + i}", **fields)
                           for i in range(n)]).new_ids
    with store.transaction() as s:
        s.add_all(Edit(fact_id=i, backend=backend, status="applied") for i in ids)
    return ids


def evaluator(store, tiny, **overrides) -> SelfEvaluator:
    model, tok = tiny
    unedited = overrides.pop("unedited", None)
    return SelfEvaluator(store, model, tok, SelfEvalConfig(**{**TINY, **overrides}), unedited=unedited,
                         model_name="tiny")


def points(store) -> dict[int, dict[str, float]]:
    with store.transaction() as s:
        rows = s.execute(select(EvalPoint.n_edits, EvalPoint.metric, EvalPoint.value, EvalPoint.method)).all()
    out: dict[int, dict[str, float]] = {}
    for n, metric, value, method in rows:
        assert method == "agent"
        out.setdefault(n, {})[metric] = value
    return out


def test_points_every_n_applied_facts_and_not_between(store, tiny):
    learned(store, 6)
    ev = evaluator(store, tiny, every=2)
    assert ev.maybe_run(0) is None and ev.maybe_run(1) is None and points(store) == {}
    first = ev.maybe_run(2)
    assert first["n_edits"] == 2
    assert {"retention_tf", "retention_gen", "retention_n", "locality", "locality_gen", "fluency",
            "eval_seconds"} <= set(first)
    assert ev.maybe_run(2) is None and ev.maybe_run(3) is None
    assert ev.maybe_run(5)["n_edits"] == 5  # a batch jumped past 4: one point, at the real total
    assert ev.maybe_run(5) is None
    assert ev.maybe_run(6) is not None
    stored = points(store)
    assert sorted(stored) == [2, 5, 6]
    assert stored[2]["retention_n"] == 4 and stored[2]["locality"] == 1.0
    assert {k: v for k, v in stored[2].items() if k != "eval_seconds"} == \
        {k: v for k, v in first.items() if k not in ("n_edits", "eval_seconds")}
    assert ev.last_point()["n_edits"] == 6
    with store.transaction() as s:
        run = s.scalars(select(EvalRun)).one()
    assert run.protocol == "agent" and run.methods == ["agent"] and run.model == "tiny"
    assert run.settings["every"] == 2 and run.settings["n_probes"] == 40


def test_the_run_row_is_created_lazily_and_reused_after_a_restart(store, tiny):
    learned(store, 4)
    ev = evaluator(store, tiny, every=2)
    assert ev.run_id is None and store.get_meta(RUN_KEY) is None  # nothing until the first point
    ev.maybe_run(2)
    run_id = ev.run_id
    assert store.get_meta(RUN_KEY) == str(run_id)
    again = evaluator(store, tiny, every=2)  # a new process: the last point is read from the store
    assert again.run_id == run_id
    assert again.maybe_run(2) is None and again.maybe_run(3) is None
    assert again.maybe_run(4) is not None
    with store.transaction() as s:
        assert s.scalar(select(func.count()).select_from(EvalRun)) == 1
        assert set(s.scalars(select(EvalPoint.run_id))) == {run_id}
    assert sorted(points(store)) == [2, 4]


def test_base_answers_are_cached_per_model_and_reused(store, tiny):
    learned(store, 2)
    entered = []

    @contextlib.contextmanager
    def unedited():
        entered.append(1)
        yield

    ev = evaluator(store, tiny, every=1, unedited=unedited)
    ev.maybe_run(1)
    assert ev.base_computed and entered == [1]
    files = list((store.data_dir / "selfeval").glob("base-*.json"))
    assert len(files) == 1 and files[0] == cache_path(store.data_dir, json.loads(files[0].read_text())["key"]["fingerprint"])
    stamp = files[0].stat().st_mtime_ns
    ev.maybe_run(2)
    restarted = evaluator(store, tiny, every=1, unedited=unedited)
    restarted.maybe_run(3)
    assert not restarted.base_computed and entered == [1]  # read from the file, not recomputed
    assert files[0].stat().st_mtime_ns == stamp
    assert points(store)[3]["locality"] == 1.0
    other = evaluator(store, tiny, every=1, unedited=unedited, fluency_tokens=9)  # other settings: another key
    other.base_answers()
    assert other.base_computed and entered == [1, 1]


def test_locality_is_one_unedited_and_drops_when_an_edit_changes_probe_answers(store, tiny):
    model, tok = tiny
    ids = store.add_facts([FactInput(prompt="Fact Zorbia is", target="Quellmarsh")]).new_ids
    state = ModelState(store, model)
    state.rebuild()
    ev = evaluator(store, tiny, every=1, unedited=state.unedited)
    clean = ev.run(1)
    assert clean["locality"] == 1.0 and clean["locality_gen"] == 1.0
    with store.transaction() as s:
        fact = s.get(Fact, ids[0])
    assert state.apply(fact, NoiseEditor(model), "ftm").ok
    live = {k: v.clone() for k, v in model.state_dict().items()}
    hit = ev.maybe_run(2)
    assert hit["locality"] < 0.9 and hit["locality_gen"] < 1.0
    assert all(torch.equal(live[k], v) for k, v in model.state_dict().items())  # the edits stay in

    # A new process on the edited store: the base answers are computed with the edit taken out, so
    # locality still says how far the live model moved; without a way to take the edits out, it refuses.
    (cache,) = (store.data_dir / "selfeval").glob("base-*.json")
    cache.unlink()
    fresh = evaluator(store, tiny, every=1, unedited=state.unedited)
    assert fresh.run(3)["locality"] == hit["locality"] and fresh.base_computed
    cache.unlink()
    with pytest.raises(ConfigError, match="without its weight edits"):
        evaluator(store, tiny, every=1).run(4)


def test_the_base_answers_never_run_inside_reading(store, tiny):
    learned(store, 2)
    events = []

    @contextlib.contextmanager
    def mark(name):
        events.append(f"{name} in")
        yield
        events.append(f"{name} out")

    ev = evaluator(store, tiny, every=1, unedited=lambda: mark("unedited"))
    ev.maybe_run(1, reading=mark("reading"))
    assert events == ["unedited in", "unedited out", "reading in", "reading out"]
    assert ev.maybe_run(1, reading=mark("reading")) is None and len(events) == 4  # not due: not entered


def test_the_retention_sample_is_seeded_and_holds_only_learned_global_facts(store, tiny):
    ids = learned(store, 30)
    not_learned = store.add_facts([FactInput(prompt="Unlearned is", target="x")]).new_ids
    scoped = learned(store, 3, scope="user", user_id="ann")
    with store.transaction() as s:
        s.get(Fact, ids[0]).status = "deleted"
    a = [f.id for f in evaluator(store, tiny, sample=10, seed=7).learned_sample()]
    assert a == [f.id for f in evaluator(store, tiny, sample=10, seed=7).learned_sample()]
    assert a != [f.id for f in evaluator(store, tiny, sample=10, seed=8).learned_sample()]
    assert len(a) == 10 and set(a) <= set(ids[1:]) and a == sorted(a)
    assert not set(a) & set(not_learned + scoped)
    everything = [f.id for f in evaluator(store, tiny, sample=100).learned_sample()]
    assert everything == ids[1:]  # K above the learned count: all of them


def test_config_and_probe_file_are_validated(tmp_path):
    with pytest.raises(ConfigError, match="every"):
        SelfEvalConfig(every=0)
    with pytest.raises(ConfigError, match="sample"):
        SelfEvalConfig(sample=-1)
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "A is", "answer": "b"}\n{"prompt": "no answer"}\n')
    with pytest.raises(ConfigError, match=r"p\.jsonl:2"):
        load_probes(bad)
    probes = load_probes(DEFAULT_PROBES)
    assert len(probes) == 40 and len({p.prompt for p in probes}) == 40


def _cli(capsys, *argv):
    from agent.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def report_command(monkeypatch):
    """`engram report` registered as the lead will register it (a no-op once agent/commands has it)."""
    from agent import cli, commands
    from agent.commands import report

    monkeypatch.setitem(commands.REGISTRY, "report", report.COMMANDS["report"])
    monkeypatch.setattr(cli, "MODEL_FREE", cli.MODEL_FREE | {"report"})


def test_engram_report_draws_the_curves_from_the_store(store, tiny, tmp_path, capsys, report_command):
    db = str(store.url)
    code, _, err = _cli(capsys, "report", "--db", db, "--out", str(tmp_path / "none"))
    assert code == 2 and "no self-evaluation" in err
    learned(store, 6)
    ev = evaluator(store, tiny, every=2)
    for n in (2, 4, 6):
        ev.maybe_run(n)
    out = tmp_path / "report"
    code, text, _ = _cli(capsys, "report", "--db", db, "--out", str(out))
    assert code == 0 and "3 self-evaluation point(s); latest at 6" in text
    for metric in ("rates", "retention_tf", "retention_gen", "locality", "locality_gen", "fluency", "eval_seconds"):
        assert (out / f"plot-{metric}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "plot-retention_n.png").exists()
    page = (out / "report.html").read_text()
    assert page.count("<img src=\"data:image/png;base64,") == 7 and "<td>6</td>" in page
    assert len((out / "selfeval.csv").read_text().splitlines()) == 4
    code, text, _ = _cli(capsys, "report", "--db", db, "--out", str(out), "--json")
    payload = json.loads(text)
    assert code == 0 and [p["n_edits"] for p in payload["points"]] == [2, 4, 6]
    with pytest.raises(SystemExit):  # a model-free command: --model is not one of its flags
        _cli(capsys, "report", "--db", db, "--model", "x")


@pytest.mark.slow
def test_one_point_with_the_default_model_is_cheap(store, default_model):
    """K=20 learned facts and the 40 probes on SmolLM2-135M (CPU): the base answers once, then a point."""
    from agent.demo_facts import DEMO_FACTS

    ids = store.add_facts([FactInput(**f) for f in DEMO_FACTS]).new_ids
    with store.transaction() as s:
        s.add_all(Edit(fact_id=i, backend="gist", status="applied") for i in ids)
    ev = SelfEvaluator(store, default_model.model, default_model.tokenizer, SelfEvalConfig(every=10, sample=20),
                       model_name=default_model.name)
    started = time.perf_counter()
    ev.base_answers()
    base_s = time.perf_counter() - started
    started, cpu = time.perf_counter(), time.process_time()
    point = ev.maybe_run(20)
    point_s, cpu_s = time.perf_counter() - started, time.process_time() - cpu
    # with one thread, CPU seconds are what the wall time is on an idle core (a busy machine shares it)
    print(f"\nself-evaluation on {default_model.name}, {torch.get_num_threads()} torch thread(s): base answers "
          f"{base_s:.1f} s (once per model), one point {point_s:.1f} s wall, {cpu_s:.1f} s CPU: {point}")
    assert point["retention_n"] == 20 and point["locality"] == 1.0 and point["locality_gen"] == 1.0
    assert 0.0 <= point["retention_tf"] < 0.5  # unedited: the counterfactual targets are not known
    assert point["fluency"] > 5.0
    assert point_s < 30.0  # ~7 s with one thread on a 2-CPU machine that two evaluations keep busy
