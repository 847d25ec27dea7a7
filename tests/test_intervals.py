"""Bootstrap intervals over cases: the statistics, results.json's "ci" blocks and results_table.py's brackets."""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from evaluation import intervals
from evaluation.intervals import bootstrap_interval, bootstrap_intervals, paired_difference_interval, within_noise
from evaluation.measure import METRICS, CaseScore, aggregate

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import results_table  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "datasets"


def _rates(n: int, p: float = 0.8, seed: int = 1, missing: float = 0.0) -> list[float | None]:
    rng = np.random.default_rng(seed)
    hits = (rng.random(n) < p).astype(float)
    gone = rng.random(n) < missing
    return [None if g else float(h) for h, g in zip(hits, gone)]


def _width(ci: tuple[float, float]) -> float:
    return ci[1] - ci[0]


@pytest.mark.parametrize("n,p,missing", [(5, 0.5, 0.0), (40, 0.9, 0.3), (300, 0.1, 0.0), (1000, 0.97, 0.5)])
def test_the_interval_contains_the_point_estimate(n, p, missing):
    values = _rates(n, p, seed=n, missing=missing)
    point = aggregate([CaseScore(str(i), edit_success=v) for i, v in enumerate(values)])["edit_success"]
    low, high = bootstrap_interval(values)
    assert low <= point <= high and 0.0 <= low <= high <= 1.0


def test_it_narrows_as_the_number_of_cases_grows():
    widths = [_width(bootstrap_interval(_rates(n, 0.7, seed=3))) for n in (30, 300, 3000)]
    assert widths[0] > widths[1] > widths[2] > 0
    # the standard error of a rate shrinks as 1/sqrt(n): ten times the cases, about a third of the width
    assert 0.2 < widths[1] / widths[0] < 0.5 and 0.2 < widths[2] / widths[1] < 0.5


def test_it_is_deterministic_given_the_seed():
    values = _rates(200, 0.6)
    assert bootstrap_interval(values, seed=7) == bootstrap_interval(values, seed=7)
    assert bootstrap_interval(values, seed=7) != bootstrap_interval(values, seed=8)
    assert bootstrap_interval(values, n_resamples=2000) == bootstrap_interval(np.array(values, dtype=float))


def test_all_equal_values_give_a_zero_width_interval():
    assert bootstrap_interval([1.0] * 50) == (1.0, 1.0)
    assert bootstrap_interval([0.1] * 37 + [None] * 5) == (0.1, 0.1)  # no float drift from the sums


def test_too_few_cases_give_no_interval():
    assert bootstrap_interval([]) is None and bootstrap_interval([None, None]) is None
    assert bootstrap_interval([0.5, None]) is None  # one case resamples to itself: no certainty to claim
    with pytest.raises(ValueError):
        bootstrap_interval(lambda idx: 0.0)


def test_the_resampled_statistic_is_aggregates_mean_over_resampled_cases():
    """The vectorised None-skipping mean equals aggregate() run on each resample of the CaseScores."""
    rng = np.random.default_rng(5)
    scores = [CaseScore(str(i), edit_success=float(rng.random() < 0.8),
                        portability=None if rng.random() < 0.6 else float(rng.random()),
                        locality=float(rng.integers(0, 8)) / 7)  # a mean over ~7 probes, resampled as one case
              for i in range(60)]
    columns = intervals.columns_of(scores, ("edit_success", "portability", "locality"))
    fast = bootstrap_intervals(columns, n_resamples=300)
    for name, ci in fast.items():
        slow = bootstrap_interval(lambda idx: aggregate([scores[i] for i in idx])[name], n_cases=len(scores),
                                  n_resamples=300)
        assert ci == pytest.approx(slow, abs=1e-12), name
    # JSON dicts (the points files) give the same columns as CaseScore objects
    assert intervals.columns_of([s.to_json() for s in scores], ("portability",)) == \
        intervals.columns_of(scores, ("portability",))


def test_paired_difference_of_a_method_with_itself_is_zero():
    values = _rates(500, 0.6, missing=0.2)
    assert paired_difference_interval(values, values) == (0.0, 0.0)
    assert within_noise((0.0, 0.0)) and within_noise((-0.02, 0.05)) and not within_noise((0.01, 0.05))
    assert not within_noise(None)
    with pytest.raises(ValueError):
        paired_difference_interval(values, values[:-1])


def test_pairing_removes_the_spread_the_two_methods_share():
    """B is A plus a small win on a few cases: unpaired intervals overlap, the paired one excludes 0."""
    a = _rates(400, 0.5, seed=11)
    b = list(a)
    flipped = [i for i, v in enumerate(a) if v == 0.0][:20]
    for i in flipped:
        b[i] = 1.0
    ci_a, ci_b = bootstrap_interval(a), bootstrap_interval(b)
    assert ci_b[0] < ci_a[1]  # the separate intervals overlap: alone they would say "not a win"
    diff = paired_difference_interval(b, a)
    assert diff[0] > 0 and not within_noise(diff)
    assert diff[0] <= aggregate_mean(b) - aggregate_mean(a) <= diff[1]


def aggregate_mean(values: list[float | None]) -> float:
    return aggregate([CaseScore(str(i), rephrase=v) for i, v in enumerate(values)])["rephrase"]


def test_a_thousand_case_run_costs_well_under_a_second_per_table():
    """~10 metrics x 8 methods x (gap-0 + retention) on 1,000 cases, as report.write_all computes them."""
    rng = np.random.default_rng(0)
    methods = [[CaseScore(str(i), **{m: (None if rng.random() < 0.2 else float(rng.random())) for m in METRICS})
                for i in range(1000)] for _ in range(8)]
    started = time.perf_counter()
    for scores in methods:
        for _ in range(2):
            block = intervals.case_intervals(scores, METRICS)
    seconds = time.perf_counter() - started
    assert set(block) == set(METRICS) and all(v is not None for v in block.values())
    assert seconds < 3.0, seconds


# -- end to end: a tiny harness run -------------------------------------------------------------------
@dataclass
class Loaded:
    model: object
    tokenizer: object
    name: str = "tiny-llama"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from editors.model import tiny_llama, tiny_tokenizer
    from evaluation.harness import EvalConfig, Harness
    from evaluation.report import write_all
    from memory.embeddings import HashEmbedder

    tmp = tmp_path_factory.mktemp("ci")
    mp = pytest.MonkeyPatch()
    mp.setenv("ENGRAM_CACHE", str(tmp / "cache"))
    try:
        model = tiny_llama()
        model.config.max_position_embeddings = 256
        loaded = Loaded(model, tiny_tokenizer())
        # rome_counterfact: both cases have locality probes, so locality gets an interval too
        cfg = EvalConfig(dataset=str(FIXTURES / "rome_counterfact.json"), out=str(tmp / "out"),
                         methods=["base", "icl", "gist"], n=2, every=None, fluency_n=2, fluency_tokens=8, gen_tokens=4)
        runs = Harness(cfg, loaded, embedder=HashEmbedder(32)).run()
        write_all(Path(cfg.out), cfg, loaded, runs, 1.0, None)
    finally:
        mp.undo()
    return Path(cfg.out)


def test_results_json_carries_an_interval_beside_every_value(run_dir):
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["intervals"]["level"] == 0.95 and saved["intervals"]["n_resamples"] == intervals.N_RESAMPLES
    for name in ("base", "icl"):
        summary = saved["methods"][name]
        for block in (summary, summary["retention"]):
            assert set(block["ci"]) == set(METRICS)
            for key, ci in block["ci"].items():
                if ci is not None:
                    assert ci[0] <= block[key] <= ci[1], (name, key)
        assert summary["ci"]["edit_success"] is not None and summary["ci"]["fluency"] is not None
        assert isinstance(summary["edit_success"], float)  # the flat keys old readers use are unchanged
        assert "seconds_per_edit" not in summary["ci"]
    assert saved["methods"]["base"]["ci"]["locality"] == [1.0, 1.0]  # the base model against itself
    assert saved["methods"]["gist"]["available"] is False and saved["methods"]["gist"]["ci"]["edit_success"] is None


def _table(capsys, *argv) -> str:
    assert results_table.main([str(a) for a in argv]) == 0
    return capsys.readouterr().out


def test_results_table_prints_the_intervals(run_dir, capsys):
    saved = json.loads((run_dir / "results.json").read_text())
    out = _table(capsys, run_dir)
    es, ci = saved["methods"]["icl"]["edit_success"], saved["methods"]["icl"]["ci"]["edit_success"]
    assert f"{es:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]" in out
    assert "After all edits (retention):" in out and "95% percentile bootstrap over cases" in out


def test_an_old_results_json_gets_its_intervals_from_the_per_case_files(run_dir, tmp_path, capsys):
    new = _table(capsys, run_dir)
    old = tmp_path / "old"
    old.mkdir()
    saved = json.loads((run_dir / "results.json").read_text())
    del saved["intervals"]
    for summary in saved["methods"].values():
        summary.pop("ci", None)
        (summary.get("retention") or {}).pop("ci", None)
    (old / "results.json").write_text(json.dumps(saved))
    bare = _table(capsys, old)  # no per-case files: the values alone, with a note
    assert "[" not in bare.split("Brackets:")[0] and "points-icl.jsonl is missing" in bare
    for f in run_dir.glob("*.jsonl"):
        (old / f.name).write_bytes(f.read_bytes())
    rebuilt = _table(capsys, old)
    assert "computed from the per-case files" in rebuilt
    # the same intervals as results.json had, except PPL_r's: the points files do not hold its per-case values
    icl = json.loads((run_dir / "results.json").read_text())["methods"]["icl"]
    es, ci = icl["edit_success"], icl["ci"]["edit_success"]
    assert f"{es:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]" in rebuilt
    assert icl["ci"]["pplr"] is not None and f"{icl['pplr']:.3f} [" in new and f"{icl['pplr']:.3f} [" not in rebuilt


def test_compare_prints_a_paired_difference(run_dir, capsys):
    out = _table(capsys, run_dir, "--compare", "icl,icl", "--compare", "icl,base")
    assert "icl − icl, gap-0 (paired bootstrap over the same 2 cases)" in out
    self_rows = out.split("icl − icl, gap-0")[1].split("icl − base")[0]
    assert "| +0.000 | [+0.00, +0.00] | within noise |" in self_rows
    assert "icl − base, after all edits (retention)" in out and "Not compared: PPL_r" in out
    assert "Cannot compare" in _table(capsys, run_dir, "--compare", "icl,nope")
    with pytest.raises(SystemExit):
        results_table.main([str(run_dir), "--compare", "icl"])


def test_the_difference_of_two_independent_slices():
    from evaluation.intervals import difference_interval, within_noise

    same = [1.0, 0.0] * 50
    assert within_noise(difference_interval(same, list(same)))
    low, high = difference_interval([1.0] * 90 + [0.0] * 10, [1.0] * 50 + [0.0] * 50)
    assert 0.2 < low < 0.4 < high < 0.55 and not within_noise((low, high))  # 0.9 - 0.5 = 0.4
    assert difference_interval([1.0], [0.0, 1.0]) is None
