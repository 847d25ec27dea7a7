"""Dataset loaders: hand-made fixtures for every format, and the real files when ../shared/data is present."""
from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest

from evaluation.datasets import EditCase, Probe, detect_format, load_dataset, normalize_answers
from memory.errors import ValidationError

FIX = Path(__file__).parent / "fixtures" / "datasets"
REAL = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.parametrize("name, fmt", [
    ("knowedit_zsre.json", "knowedit"), ("knowedit_wiki.json", "knowedit"), ("knowedit.jsonl", "knowedit"),
    ("wikibio.json", "wikibio"), ("zsre.json", "zsre"), ("counterfact.json", "counterfact"),
    ("rome_counterfact.json", "rome"), ("mquake.json", "mquake"), ("dune/mini_new_info.json", "dune"),
    ("dune/mini_debiasing_I.json", "dune"), ("dune/mini_arithmetic.json", "dune"),
])
def test_detect_format(name, fmt):
    assert detect_format(FIX / name) == fmt
    cases = load_dataset(FIX / name, format=fmt)  # an explicit format agrees with detection
    assert cases and all(isinstance(c, EditCase) for c in cases)


def test_normalize_answers_shapes():
    assert normalize_answers("Paris") == ["Paris"]
    assert normalize_answers(["Paris", "City of Light"]) == ["Paris", "City of Light"]
    assert normalize_answers([["actor", "actress"], ["film actor"], ["actor"]]) == ["actor", "actress", "film actor"]
    assert normalize_answers(None) == [] and normalize_answers(["", " "]) == []


def test_knowedit_zsre():
    first, second = load_dataset(FIX / "knowedit_zsre.json")
    assert (first.prompt, first.subject, first.target) == ("What is the capital of Glorbania?", "Glorbania", "Lunaria")
    assert first.ground_truth == ["Port Veldt", "Veldt"]
    assert first.rephrases == ["Which city is Glorbania's capital?"]
    assert first.portability == [
        Probe("The river flowing through the capital of Glorbania is", ["Moon River"], "reasoning"),
        Probe("What is the capital of the Glorb Republic?", ["Lunaria"], "subject_aliasing"),
    ]
    assert first.locality == [Probe("The currency of Glorbania is", ["glorb"], "relation_specificity")]
    assert second.portability == [] and second.locality == []
    assert first.edits[0].target == "Lunaria" and len(first.edits) == 1  # every editable case lists its edit
    assert first.case_id == "knowedit_zsre-0" and first.source == "knowedit"


def test_knowedit_wiki_alias_lists_and_missing_ground_truth():
    cf, recent = load_dataset(FIX / "knowedit_wiki.json")
    assert cf.ground_truth == ["Chile"] and cf.rephrases == []
    assert cf.portability[0].answers == ["Norwegian krone", "NOK"]
    occupation, forget = cf.locality  # the probe whose ground truth is [[]] is dropped
    assert occupation.answers == ["painter", "artist", "sculptor"] and occupation.answer == "painter"
    assert forget.kind == "forgetfulness" and forget.answers == ["Chile"]
    assert recent.ground_truth == [] and recent.editable  # wiki_recent: insertions have no old answer


def test_jsonl_is_read_and_limit_applies():
    cases = load_dataset(FIX / "knowedit.jsonl")
    assert [c.target for c in cases] == ["oboe", "Welsh"]
    assert cases[1].ground_truth == ["Danish"]
    assert len(load_dataset(FIX / "knowedit.jsonl", limit=1)) == 1
    assert load_dataset(FIX / "knowedit.jsonl", limit=0) == []


def test_wikibio():
    (case,) = load_dataset(FIX / "wikibio.json")
    assert case.subject == "ada pennyworth" and case.prompt.startswith("This is a Wikipedia passage")
    assert case.target == "She catalogued the ferns of the northern moors."
    assert case.locality[0].answers == ["botany"] and case.portability == []


def test_zsre_three_portability_files():
    one_hop, subject_replace, inverse = load_dataset(FIX / "zsre.json")
    assert (one_hop.prompt, one_hop.target, one_hop.ground_truth) == ("When was the Zentor Cup first held?", "1975",
                                                                     ["1988"])
    assert one_hop.rephrases == ["In what year did the Zentor Cup start?"]
    assert one_hop.portability == [Probe("Which sport's Zentor Cup began in 1975?", ["rowing"], "one_hop")]
    assert one_hop.locality == [Probe("nq question: who painted the ceiling of the blue hall", ["Anna Ferro"], "nq")]
    assert subject_replace.portability == [Probe("Which constellation holds NGC 9999?", ["Lyra"], "subject_replace")]
    assert subject_replace.locality == []
    assert inverse.portability == [Probe("Who is Karel Brill's brother?", ["Tomas Brill"], "inverse_relation")]


def test_counterfact_edit_val():
    case = load_dataset(FIX / "counterfact.json")[1]
    assert case.case_id == "12" and case.prompt == "Quasar X9 was developed by" and case.target == "Nokia"
    assert case.ground_truth == ["Sony"] and case.rephrases == ["The makers of Quasar X9 are"]
    assert case.locality == [Probe("Walkbox was developed by", ["Sony"], "neighborhood")]


def test_rome_counterfact_portability_and_subject_replace():
    port, alias = load_dataset(FIX / "rome_counterfact.json")
    assert port.prompt == "Greta Holm was born in" and port.target == "Lisbon" and port.ground_truth == ["Vienna"]
    assert port.rephrases == ["Greta Holm's birthplace is", "Greta Holm is native to"]
    assert [p.prompt for p in port.locality] == ["Karl Roth was born in", "Eva Lind is native to"]
    assert all(p.answers == ["Vienna"] for p in port.locality)  # neighbours keep the true object
    assert port.portability == [Probe("Which river flows through the city where Greta Holm was born?", ["Tagus"],
                                      "one_hop")]
    assert port.generation_prompts == ["Greta Holm's parents are from"]
    assert alias.portability == [Probe("M. Fini died in", ["Oslo"], "subject_replace")]


def test_mquake_edits_multihop_and_hops():
    (case,) = load_dataset(FIX / "mquake.json")
    assert case.case_id == "55" and len(case.edits) == 2
    assert [(e.prompt, e.target, e.ground_truth) for e in case.edits] == [
        ("The Glass Harbour was written by", "Lena Ost", ["Tom Reed"]),
        ("Lena Ost is a citizen of", "Peru", ["Canada"]),
    ]
    assert case.edits[1].question == "What is the country of citizenship of Lena Ost?"
    assert (case.prompt, case.target) == (case.edits[0].prompt, case.edits[0].target)
    assert len(case.multihop) == 3 and all(p.answers == ["Peru", "Republic of Peru", "PE"] for p in case.multihop)
    assert [h.prompt for h in case.hops] == ["The Glass Harbour was written by", "Lena Ost is a citizen of"]
    assert case.hops[0].answers == ["Lena Ost", "L. Ost"]
    assert case.meta["answer"] == ["Ireland", "Eire"]


def test_dune_files():
    (info,) = load_dataset(FIX / "dune" / "mini_new_info.json")
    assert info.text.startswith("March 3, 2031") and not info.editable and info.edits == []
    assert [(p.answer, p.kind) for p in info.portability] == [("B", "dune_test"), ("March 3, 2031", "dune_test")]
    (sci,) = load_dataset(FIX / "dune" / "mini_scientific.json")
    assert sci.portability[0].answers == ["B"] and sci.portability[0].prompt.startswith("Why does ice")
    first, _ = load_dataset(FIX / "dune" / "mini_arithmetic.json")
    assert (first.prompt, first.target) == ("12 * 3 - 6 =", "31")
    assert first.portability[0].answers == ["31"]
    (bias,) = load_dataset(FIX / "dune" / "mini_debiasing_I.json")  # the "edits:" key; the garbled triple is skipped
    assert [(p.answer, p.kind) for p in bias.portability] == [("the woman", "dune_biased")]
    (loc,) = load_dataset(FIX / "dune" / "mini_new_info_locality.json")
    assert loc.text is None and loc.portability == [] and loc.locality[0].kind == "dune_locality"


def test_unknown_format_names_the_file(tmp_path):
    with pytest.raises(ValidationError, match=r"not_a_benchmark\.json.*expected"):
        load_dataset(FIX / "not_a_benchmark.json")
    with pytest.raises(ValidationError, match="unknown dataset format"):
        load_dataset(FIX / "zsre.json", format="squad")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValidationError, match="neither JSON nor JSON Lines"):
        detect_format(broken)
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(ValidationError, match="no records"):
        load_dataset(empty)
    with pytest.raises(ValidationError, match="cannot read"):
        load_dataset(tmp_path / "missing.json")


def test_wrong_explicit_format_and_bad_record(tmp_path):
    with pytest.raises(ValidationError, match=r"record 0 is not counterfact data: missing field 'locality_prompt'"):
        load_dataset(FIX / "knowedit_zsre.json", format="counterfact")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"subject": "S", "prompt": "P is", "target_new": "T"},
                               {"subject": "S", "prompt": 3, "target_new": "T"}]))
    with pytest.raises(ValidationError, match=r"bad\.json: record 1 .*'prompt' should be a string"):
        load_dataset(bad)


# ---------------------------------------------------------------------------------------------- real data

REAL_COUNTS = {  # record counts from ../shared/data/README.md
    "knowedit/ZsRE-test-all.json": ("knowedit", 1304), "knowedit/wiki_counterfact_train_cf.json": ("knowedit", 1428),
    "knowedit/wiki_counterfact_test_cf.json": ("knowedit", 885), "knowedit/wiki_recent_train.json": ("knowedit", 570),
    "knowedit/wikibio-test-all.json": ("wikibio", 306),
    "zsre/zsre_mend_eval_portability_gpt4.json": ("zsre", 1037), "zsre/zsre_subject_replace.json": ("zsre", 293),
    "zsre/zsre_inverse_relation.json": ("zsre", 385),
    "counterfact/counterfact-edit.json": ("counterfact", 10000),
    "counterfact/counterfact-val.json": ("counterfact", 1919),
    "counterfact/counterfact_portability_gpt4.json": ("rome", 1031),
    "counterfact/counterfact_subject_replace.json": ("rome", 213),
    "mquake/MQuAKE-hard.json": ("mquake", 429),
    "dune/arithmetic.json": ("dune", 1065), "dune/arithmetic_locality.json": ("dune", 564),
    "dune/debiasing_I.json": ("dune", 145), "dune/debiasing_I_locality.json": ("dune", 900),
    "dune/debiasing_II.json": ("dune", 200), "dune/debiasing_II_locality.json": ("dune", 1352),
    "dune/new_info.json": ("dune", 200), "dune/new_info_locality.json": ("dune", 207),
    "dune/scientific.json": ("dune", 1508), "dune/scientific_locality.json": ("dune", 600),
}
# README's "records with this key" counts, to check that probes land under the right kind
REAL_KIND_COUNTS = {
    "knowedit/ZsRE-test-all.json": {"reasoning": 771, "subject_aliasing": 264, "logical_generalization": 269,
                                    "relation_specificity": 1304},
    # README: Reasoning 368, Logical_Generalization 265 records have the key; 28 of those LG lists are empty,
    # and one record's Reasoning probes all have ground truth [[]] (dropped: nothing to score)
    "knowedit/wiki_counterfact_test_cf.json": {"subject_aliasing": 684, "reasoning": 367,
                                               "logical_generalization": 237, "relation_specificity": 829,
                                               "forgetfulness": 468},
}


@pytest.mark.data
def test_real_files_load_with_readme_counts():
    if not REAL.is_dir():
        pytest.skip(f"real benchmark data not found at {REAL} (../shared/data); the loaders are covered by fixtures")
    missing = [name for name in REAL_COUNTS if not (REAL / name).exists()]
    assert not missing, f"files listed in the data README are missing: {missing}"
    for name, (fmt, count) in REAL_COUNTS.items():
        assert detect_format(REAL / name) == fmt, name
        cases = load_dataset(REAL / name)
        assert len(cases) == count, name
        if fmt != "dune":
            assert all(c.editable and c.edits for c in cases), name
    for name, expected in REAL_KIND_COUNTS.items():
        seen = collections.Counter(kind for c in load_dataset(REAL / name)
                                   for kind in {p.kind for p in c.portability + c.locality})
        assert dict(seen) == expected, name
    mquake = load_dataset(REAL / "mquake/MQuAKE-hard.json")
    assert all(len(c.edits) == 4 and len(c.multihop) == 3 and len(c.hops) == 4 for c in mquake)
