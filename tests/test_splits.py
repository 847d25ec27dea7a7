"""The validation split (evaluation/splits.py): a synthetic source for the rules, the real files for the claims
that docs/validation.md makes (skipped without ../shared/data)."""
from __future__ import annotations

import hashlib
import json
import random
import sys
from pathlib import Path

import pytest

from editors.incomes.traindata import TRAIN_FILES, load_train_facts, parse_record, split_holdout
from evaluation.datasets import MANIFEST, detect_format, load_dataset
from evaluation.splits import addon_holdout, build_validation, gate_audit, train_rows
from memory.errors import ConfigError, ValidationError

REAL = Path(__file__).resolve().parents[2] / "shared" / "data"
ROOT = Path(__file__).resolve().parents[1]
NAMES = ("counterfact", "wiki_counterfact", "wiki_recent")
SIZES = (60, 20, 10)  # synthetic records per train file
HOLDOUT = 20


def _counterfact(i: int) -> dict:
    return {"case_id": 1000 + i, "prompt": f"The mother tongue of Person{i} is", "target_new": "French",
            "subject": f"Person{i}", "ground_truth": "English", "rephrase_prompt": f"Person{i} grew up speaking",
            "locality_prompt": "Michel Rocard is a native speaker of", "locality_ground_truth": "French"}


def _knowedit(i: int, recent: bool) -> dict:
    rec = {"subject": f"Place{i}", "prompt": f"The capital of Place{i} is", "target_new": f"City{i}",
           "portability": {"Subject_Aliasing": [{"prompt": f"The capital of P{i} is", "ground_truth": [[f"City{i}"]]}]},
           "locality": {"Relation_Specificity": [{"prompt": f"The currency of Place{i} is",
                                                  "ground_truth": [["glorb"]]}]}}
    return rec if recent else {**rec, "ground_truth": ["Oldtown"]}


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """Three small train files under the trainer's names, with one held-out record duplicated at a trained
    position, and an evaluation file that shares one subject with a held-out record: the split drops both."""
    root = tmp_path / "data"
    records = ([_counterfact(i) for i in range(SIZES[0])], [_knowedit(i, False) for i in range(SIZES[1])],
               [_knowedit(100 + i, True) for i in range(SIZES[2])])
    held = set(addon_holdout(sum(SIZES), HOLDOUT, 0))
    wiki = range(SIZES[0], SIZES[0] + SIZES[1])  # positions of wiki_counterfact's records in the trainer's list
    copied, trained = min(i for i in wiki if i in held), min(i for i in wiki if i not in held)
    records[1][trained - SIZES[0]] = dict(records[1][copied - SIZES[0]])
    for name, recs in zip(TRAIN_FILES, records):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(json.dumps(recs))
    first_held_cf = min(i for i in held if i < SIZES[0])
    val = [{**_counterfact(first_held_cf), "case_id": 1}]
    (root / "counterfact" / "counterfact-val.json").write_text(json.dumps(val))
    return root


def _build(data: Path, out: Path, **kw) -> dict:
    return build_validation(data, out, holdout=HOLDOUT, **kw)


def test_split_is_the_trainers_holdout_minus_eval_subjects(data, tmp_path):
    manifest = _build(data, tmp_path / "splits")
    train, held = split_holdout(load_train_facts(data), HOLDOUT, 0)  # exactly what train.py does
    files = [tmp_path / "splits" / f"validation-{n}.json" for n in NAMES]
    written = [parse_record(r) for f in files for r in json.loads(f.read_text())]
    assert written and not set(written) & set(train)  # disjoint from every fact the add-on trains on
    dropped = [i for n in NAMES for key in ("dropped_eval_subject", "dropped_trained_duplicate")
               for i in manifest["splits"][n][key]]
    assert len(written) + len(dropped) == len(held) == HOLDOUT
    assert len(dropped) == 2 and manifest["splits"]["counterfact"]["eval_subject_overlap"] == {
        "counterfact/counterfact-val.json": 1}
    assert len(manifest["splits"]["wiki_counterfact"]["dropped_trained_duplicate"]) == 1
    assert not {(f.edit.prompt, f.edit.answer) for f in written} & {(f.edit.prompt, f.edit.answer) for f in train}
    val_subjects = {json.loads((data / "counterfact" / "counterfact-val.json").read_text())[0]["subject"]}
    assert not {f.subject for f in written} & val_subjects
    for n in NAMES:  # indices are source positions, in source order, matching the records written
        entry, source = manifest["splits"][n], json.loads((data / manifest["splits"][n]["source"]).read_text())
        assert entry["indices"] == sorted(entry["indices"])
        assert [source[i] for i in entry["indices"]] == json.loads((tmp_path / "splits" / entry["file"]).read_text())


def test_deterministic_given_the_seed(data, tmp_path):
    a, b = _build(data, tmp_path / "a"), _build(data, tmp_path / "b")
    assert a == b
    for entry in a["splits"].values():
        assert (tmp_path / "a" / entry["file"]).read_bytes() == (tmp_path / "b" / entry["file"]).read_bytes()
    assert (tmp_path / "a" / MANIFEST).read_bytes() == (tmp_path / "b" / MANIFEST).read_bytes()
    other = _build(data, tmp_path / "c", seed=7)  # the seed only picks the twins' question forms
    assert [other["splits"][n]["indices"] for n in NAMES] == [a["splits"][n]["indices"] for n in NAMES]


def test_written_files_load_as_editable_cases(data, tmp_path, monkeypatch):
    manifest = _build(data, tmp_path / "splits")
    monkeypatch.setenv("ENGRAM_SPLITS", str(tmp_path / "splits"))
    for name, entry in manifest["splits"].items():
        path = tmp_path / "splits" / entry["file"]
        assert detect_format(path) == detect_format(data / entry["source"])  # the source's own format
        cases = load_dataset(f"validation:{name}")  # the name `engram eval --dataset` takes
        assert len(cases) == entry["records"] > 0 and all(c.editable for c in cases)
        assert [c.prompt for c in cases] == [c.prompt for c in load_dataset(path)]
        if name.endswith("-questions"):
            assert all(c.prompt.endswith("?") and c.rephrases for c in cases)
            assert set(entry["indices"]) <= set(manifest["splits"][name.removesuffix("-questions")]["indices"])


def test_missing_split_names_the_build_command(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGRAM_SPLITS", str(tmp_path))
    with pytest.raises(ValidationError, match="python -m evaluation.splits"):
        load_dataset("validation:counterfact")


def test_refuses_a_missing_train_file_and_an_out_dir_in_the_data(data, tmp_path):
    with pytest.raises(ConfigError, match="outside the data root"):
        _build(data, data / "validation")
    (data / TRAIN_FILES[2]).unlink()
    with pytest.raises(ConfigError, match="not found"):
        train_rows(data)


def test_gate_audit_counts_the_scripts_pairs(data):
    """The per-record audit reproduces scripts/train_relation_gate.py's fitted and held-out pair counts."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from train_relation_gate import labelled_pairs
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    pairs = labelled_pairs(str(data), 6000, random.Random(0))
    keys = sorted({a for a, *_ in pairs})
    random.Random(1).shuffle(keys)
    held = set(keys[:len(keys) // 5])
    audit = gate_audit(train_rows(data))
    assert audit.train_pairs == sum(a not in held and b not in held for a, b, *_ in pairs)
    assert audit.heldout_pairs == sum(a in held for a, *_ in pairs)
    assert (audit.heldout_texts, audit.texts) == (len(held), len(keys))
    assert audit.fitted and audit.fitted <= set(range(sum(SIZES)))


# -- the real files: the claims of docs/validation.md ----------------------------------------------------------------
DOC_SIZES = {"counterfact": 222, "counterfact-questions": 214, "wiki_counterfact": 31,
             "wiki_counterfact-questions": 31, "wiki_recent": 13, "wiki_recent-questions": 13}
DOC_SHA256 = {
    "counterfact": "6b05ec7458c7168c662167ed46e85427d5c55c19407a58a507b65acc9e742957",
    "counterfact-questions": "8f3035876e28566506d479a6ee5762c314318fbeace0619118c95b2704488d62",
    "wiki_counterfact": "6f583f2c618643e63fc44d0a81839cecba81a7069397f0b6f9d5de68bba15943",
    "wiki_counterfact-questions": "bdd6959a8dc1a5b17ce22d994aec2cc805438553edf5591a1518ca423f108296",
    "wiki_recent": "4cb33f7db336a5a50e518c60458462a460b2413076760635b5875053ac4d6df7",
    "wiki_recent-questions": "6ab428ecaa63bbe54f4fa50e717f0622879e90eff5e1d989099e343a16f44dad",
}

DOC_MANIFEST_SHA256 = "b83bbca55f830bbecce7b890dc7ec6acd24c9dd4fc3946356b4daaa5b65e5038"


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    if not all((REAL / f).exists() for f in TRAIN_FILES):
        pytest.skip(f"real benchmark data not found at {REAL} (../shared/data); the split rules are covered above")
    out = tmp_path_factory.mktemp("splits")
    return out, build_validation(REAL, out)


def test_real_sizes_and_hashes_are_the_documented_ones(real):
    out, manifest = real
    assert {n: e["records"] for n, e in manifest["splits"].items()} == DOC_SIZES
    assert {n: e["sha256"] for n, e in manifest["splits"].items()} == DOC_SHA256
    assert [manifest["splits"][n]["held_out"] for n in NAMES] == [254, 33, 13] and manifest["train_facts"] == 11998
    assert [manifest["splits"][n]["source_blob"] for n in NAMES] == [  # ../shared/data/README.md
        "cff53c84d8a64459eb72368312a7b61025953afb", "3040f03ab5cbe131b40456ee6b4de4d5237fd0da",
        "b0b0070fa1ed2d6d154856d75cce9f1856e0d2e6"]


def test_real_split_is_disjoint_from_training_and_from_eval_subjects(real):
    out, manifest = real
    train, _ = split_holdout(load_train_facts(REAL), 300, 0)  # the shipped add-on's --holdout 300 --seed 0
    written = [parse_record(r) for n in NAMES for r in json.loads((out / f"validation-{n}.json").read_text())]
    assert len(written) == 266 and not set(written) & set(train)
    assert not {(f.edit.prompt, f.edit.answer) for f in written} & {(f.edit.prompt, f.edit.answer) for f in train}
    assert manifest["splits"]["wiki_counterfact"]["dropped_trained_duplicate"] == [308, 311]
    subjects = set()
    for name in manifest["eval_files"]:
        for case in load_dataset(REAL / name):
            subjects |= {" ".join(s.split()).casefold() for s in [case.subject, *(e.subject for e in case.edits)]}
    assert not {" ".join(f.subject.split()).casefold() for f in written} & subjects
    assert manifest["splits"]["counterfact"]["eval_subject_overlap"] == {
        "counterfact/counterfact-val.json": 4, "counterfact/counterfact_portability_gpt4.json": 27,
        "counterfact/counterfact_subject_replace.json": 4, "knowedit/ZsRE-test-all.json": 1,
        "knowedit/wiki_counterfact_test_cf.json": 1, "zsre/zsre_mend_eval_portability_gpt4.json": 1}
    assert len(manifest["splits"]["counterfact"]["dropped_eval_subject"]) == 32
    assert manifest["splits"]["counterfact"]["ice_sweep_overlap"] == 0


def test_real_gate_audit_matches_the_shipped_gate(real):
    _, manifest = real
    shipped = json.loads((ROOT / "editors/incomes/addons/relation-gate/relation_gate.json").read_text())["extra"]
    assert manifest["gate"]["train_pairs"] == shipped["train_pairs"] == 54235
    assert manifest["gate"]["heldout_pairs"] == shipped["heldout_pairs"]
    assert (manifest["gate"]["heldout_relation_texts"], manifest["gate"]["relation_texts"]) == (
        shipped["heldout_relation_texts"], shipped["relation_texts"])
    assert [len(manifest["splits"][n]["gate_fitted"]) for n in NAMES] == [210, 31, 13]
    rows = train_rows(REAL)
    fitted, held = gate_audit(rows).fitted, addon_holdout(len(rows))
    assert len(fitted) == 9449 and len(held) == 300
    assert sum(i in fitted for i in held) == 285  # the gate's sample begins with the add-on's held-out facts
    unseen = [i for i in held if i not in fitted]
    assert len(unseen) == 15 and {rows[i].file for i in unseen} == {TRAIN_FILES[0]}


def test_real_manifest_hash_and_counts(real):
    out, manifest = real
    assert hashlib.sha256((out / MANIFEST).read_bytes()).hexdigest() == DOC_MANIFEST_SHA256
    assert [manifest["splits"][n]["subject_also_trained"] for n in NAMES] == [13, 2, 1]
