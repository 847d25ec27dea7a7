"""The validation split: the records of the train files that the shipped gist add-on never trained on.

`python -m evaluation.splits --data ../shared/data --out runs/splits` writes, per train file, the records the
add-on's trainer held out (`--holdout 300 --seed 0`, editors/incomes/traindata.split_holdout over the
trainer's own fact order), minus duplicates of trained records and those whose subject is a subject of any
evaluation file, in the source's own format; and the project's generated question twins of the same records (traindata.question_twin) in that
format too. A manifest records the seeds, the source hashes, the record indices and the shipped relation
gate's use of each record. `engram eval --dataset validation:NAME` reads `validation-NAME.json` from there
(evaluation.datasets.resolve_dataset). docs/validation.md has the rule, the sizes and the hashes.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from editors.incomes.questions import relation_questions
from editors.incomes.relation_gate import relation_text
from editors.incomes.traindata import (TRAIN_FILES, TrainFact, _relation_probes, load_train_facts, parse_record,
                                       question_twin, split_holdout)
from evaluation.datasets import DEFAULT_SPLITS_DIR, MANIFEST, load_dataset, split_file
from memory.errors import ConfigError, EngramError

log = logging.getLogger(__name__)

SPLIT_SEED = 20261203  # seeds the question forms of the generated twins (the selection is fixed by the holdout)
ADDON_HOLDOUT, ADDON_SEED = 300, 0  # the shipped add-on's --holdout and --seed (gist_addon.json extra.train_config)
GATE_FACTS, GATE_SEED = 6000, 0  # scripts/train_relation_gate.py's defaults, as relation_gate.json's command ran it
ICE_SWEEP = ("counterfact/counterfact-edit.json", 40)  # docs/ice.md: facts and probes from its first 40 records
NAMES = {"counterfact/counterfact-edit.json": "counterfact",  # split names: validation:NAME
         "knowedit/wiki_counterfact_train_cf.json": "wiki_counterfact", "knowedit/wiki_recent_train.json": "wiki_recent"}
RULE = ("the records of the train files that editors/incomes/traindata.split_holdout(load_train_facts(DATA), "
        "holdout, holdout_seed) holds out of the gist add-on's training, minus those whose edit (prompt, target) "
        "is also a trained record's (duplicate records) and those whose subject (case-folded) is a subject of any "
        "evaluation file (every other *.json under DATA), in source order; plus their question twins "
        "(traindata.question_twin, random.Random(f'{seed}:{name}')): prompt = the question, rephrase_prompt = "
        "its first paraphrase")


@dataclass(frozen=True)
class Row:
    """One train fact in the trainer's order, with the record it came from."""

    file: str
    index: int  # the record's position in its source file
    record: dict
    fact: TrainFact


def train_rows(data_root: str | Path, files: tuple[str, ...] = TRAIN_FILES) -> list[Row]:
    """The trainer's fact list (load_train_facts), each with its source record. Every file must exist: the
    trainer's list, and so which facts it held out, depends on all of them."""
    root, rows = Path(data_root), []
    for name in files:
        path = root / name
        if not path.exists():
            raise ConfigError(f"train file {path} not found: the trainer's holdout depends on every train file")
        for index, rec in enumerate(json.loads(path.read_text(encoding="utf-8"))):
            fact = parse_record(rec) if isinstance(rec, dict) else None
            if fact is not None:
                rows.append(Row(name, index, rec, fact))
    if [r.fact for r in rows] != load_train_facts(root, files):  # the order the holdout indexes must be the trainer's
        raise ConfigError("the split's fact order differs from traindata.load_train_facts'")
    return rows


def addon_holdout(n_facts: int, holdout: int = ADDON_HOLDOUT, seed: int = ADDON_SEED) -> list[int]:
    """Positions in the trainer's fact list that training never samples (the trainer's own function)."""
    return split_holdout(list(range(n_facts)), holdout, seed)[1]


def _subjects(cases) -> set[str]:
    return {_norm(s) for c in cases for s in [c.subject, *(e.subject for e in c.edits)] if s.strip()}


def eval_subjects(data_root: str | Path, train_files: tuple[str, ...] = TRAIN_FILES) -> dict[str, set[str]]:
    """Case-folded subjects of every evaluation file: each *.json under data_root that is not a train file."""
    root, out = Path(data_root), {}
    for path in sorted(root.rglob("*.json")):
        name = path.relative_to(root).as_posix()
        if name in train_files:
            continue
        try:
            out[name] = _subjects(load_dataset(path))
        except EngramError as exc:  # a file that is not a benchmark (e.g. a manifest) has no subjects to avoid
            log.warning("%s: not read for subjects (%s)", name, exc)
    return out


# -- the shipped relation gate's fit, record by record (scripts/train_relation_gate.py) ------------------------------
@dataclass(frozen=True)
class GateAudit:
    fitted: frozenset[int]  # positions whose record gave the gate at least one fitted pair
    train_pairs: int
    heldout_pairs: int
    heldout_texts: int
    texts: int


def _fact_pairs(fact: TrainFact, relations: list[str], rng: random.Random) -> list[tuple[str, str]]:
    """scripts/relation_gate_calibration.pairs for one fact, drawing from `rng` exactly as it does."""
    s, prompt = fact.subject, fact.edit.prompt
    questions = list(relation_questions(prompt, s))
    out = []
    for asked in [prompt] + questions[:1]:
        key = relation_text(asked, s)
        alike = [p.prompt for p in fact.paraphrases if s in p.prompt] + [q for q in questions if q != asked]
        out += [(key, relation_text(q, s)) for q in alike + ([prompt] if asked != prompt else [])]
        out += [(key, relation_text(q.prompt, s)) for q in fact.locality if s in q.prompt]
        r = rng.choice(relations)
        if not any(w in (prompt + " ".join(questions)).lower() for w in r.split() if len(w) > 3):
            out += [(key, f"The {r} of X is"), (key, f"X {r}")]
    return out


def gate_audit(rows: list[Row], n_facts: int = GATE_FACTS, seed: int = GATE_SEED) -> GateAudit:
    """Which records the relation gate was fitted on: train_relation_gate.labelled_pairs (a random n_facts
    facts' pairs, plus every counterfact-edit fact's paraphrase pairs), then its held-out fifth of relation
    texts; a pair is fitted when neither side is a held-out text."""
    facts = [r.fact for r in rows]
    order = [i for i, f in enumerate(facts) if f.subject]
    rng = random.Random(seed)
    rng.shuffle(order)  # the script shuffles the fact list itself: the same permutation
    chosen = order[:n_facts]
    relations = sorted(_relation_probes([facts[i] for i in chosen]))
    per = {i: _fact_pairs(facts[i], relations, rng) for i in chosen}
    for i, row in enumerate(rows):  # paraphrase_pairs over load_train_facts(root, TRAIN_FILES[:1])
        if row.file == TRAIN_FILES[0] and row.fact.subject:
            f = row.fact
            per.setdefault(i, []).extend((relation_text(f.edit.prompt, f.subject), relation_text(p.prompt, f.subject))
                                         for p in f.paraphrases if f.subject.lower() in p.prompt.lower())
    keys = sorted({a for pairs in per.values() for a, _ in pairs})
    random.Random(seed + 1).shuffle(keys)
    held = set(keys[:len(keys) // 5])
    fitted = frozenset(i for i, pairs in per.items() if any(a not in held and b not in held for a, b in pairs))
    every = [p for pairs in per.values() for p in pairs]
    return GateAudit(fitted, sum(a not in held and b not in held for a, b in every), sum(a in held for a, _ in every),
                     len(held), len(keys))


# -- writing --------------------------------------------------------------------------------------------------------
def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


def _subject(row: Row) -> str:
    return _norm(row.fact.subject)


def _edit_key(fact: TrainFact) -> tuple[str, str]:
    return _norm(fact.edit.prompt), _norm(fact.edit.answer)


def _digests(data: bytes) -> dict[str, str]:
    return {"sha256": hashlib.sha256(data).hexdigest(),
            "blob": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()}  # git hash-object


def _write(path: Path, records: list[dict]) -> dict[str, Any]:
    data = (json.dumps(records, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    path.write_bytes(data)
    return {"file": path.name, "records": len(records), "sha256": hashlib.sha256(data).hexdigest()}


def _twin_record(row: Row, rng: random.Random) -> dict | None:
    """The record asked as a question (the twin the trainer generates), in the source's format."""
    twin = question_twin(row.fact, rng)
    if twin is None:
        return None
    return {**row.record, "prompt": twin.edit.prompt, "rephrase_prompt": twin.paraphrases[0].prompt}


def build_validation(data_root: str | Path, out_dir: str | Path = DEFAULT_SPLITS_DIR, seed: int = SPLIT_SEED,
                     files: tuple[str, ...] = TRAIN_FILES, holdout: int = ADDON_HOLDOUT,
                     holdout_seed: int = ADDON_SEED, avoid_eval_subjects: bool = True,
                     audit_gate: bool = True) -> dict[str, Any]:
    """Write the validation files and their manifest into out_dir; returns the manifest."""
    root, out = Path(data_root), Path(out_dir)
    if out.resolve().is_relative_to(root.resolve()):  # its files would count as evaluation files on a rebuild
        raise ConfigError(f"write the split outside the data root {root}, not into {out}")
    rows = train_rows(root, files)
    held = sorted(addon_holdout(len(rows), holdout, holdout_seed))
    subjects = eval_subjects(root, files) if avoid_eval_subjects else {}
    every_subject = set().union(*subjects.values()) if subjects else set()
    held_set = set(held)
    trained_subjects = {_subject(r) for i, r in enumerate(rows) if i not in held_set}
    trained_edits = {_edit_key(r.fact) for i, r in enumerate(rows) if i not in held_set}
    audit = gate_audit(rows) if audit_gate else None
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {
        "seed": seed, "holdout": holdout, "holdout_seed": holdout_seed, "train_facts": len(rows), "rule": RULE,
        "eval_files": sorted(subjects), "splits": {}}
    if audit is not None:
        manifest["gate"] = {"facts": GATE_FACTS, "seed": GATE_SEED, "train_pairs": audit.train_pairs,
                            "heldout_pairs": audit.heldout_pairs, "heldout_relation_texts": audit.heldout_texts,
                            "relation_texts": audit.texts}
    for name in files:
        mine = [i for i in held if rows[i].file == name]
        subject = lambda i: _subject(rows[i])  # noqa: E731
        twice = [i for i in mine if _edit_key(rows[i].fact) in trained_edits]  # a duplicate record was trained on
        kept = [i for i in mine if subject(i) not in every_subject and i not in twice]
        data = (root / name).read_bytes()
        short = NAMES.get(name, Path(name).stem)
        entry = _write(split_file(short, out), [rows[i].record for i in kept])
        digests = {f"source_{k}": v for k, v in _digests(data).items()}
        entry.update(source=name, source_records=len(json.loads(data)), **digests,
                     held_out=len(mine), indices=[rows[i].index for i in kept],
                     dropped_trained_duplicate=[rows[i].index for i in twice],
                     dropped_eval_subject=[rows[i].index for i in mine if subject(i) in every_subject],
                     eval_subject_overlap={f: sum(subject(i) in s for i in mine) for f, s in subjects.items()
                                           if any(subject(i) in s for i in mine)},
                     subject_also_trained=sum(subject(i) in trained_subjects for i in kept))
        if audit is not None:
            entry["gate_fitted"] = [rows[i].index for i in kept if i in audit.fitted]
        if name == ICE_SWEEP[0]:
            entry["ice_sweep_overlap"] = sum(rows[i].index < ICE_SWEEP[1] for i in kept)
        manifest["splits"][short] = entry
        rng = random.Random(f"{seed}:{short}")
        twins = [(rows[i].index, t) for i in kept for t in [_twin_record(rows[i], rng)] if t is not None]
        entry_q = _write(split_file(f"{short}-questions", out), [t for _, t in twins])
        entry_q.update(source=name, generated="question twins (editors/incomes/traindata.question_twin)",
                       indices=[index for index, _ in twins])
        manifest["splits"][f"{short}-questions"] = entry_q
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m evaluation.splits", description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"),
                   help="the benchmark data root (../shared/data)")
    p.add_argument("--out", default=str(DEFAULT_SPLITS_DIR), help="where the split files and manifest go")
    p.add_argument("--seed", type=int, default=SPLIT_SEED, help="seeds the generated question twins")
    p.add_argument("--holdout", type=int, default=ADDON_HOLDOUT, help="the add-on trainer's --holdout")
    p.add_argument("--holdout-seed", type=int, default=ADDON_SEED, help="the add-on trainer's --seed")
    p.add_argument("--no-gate-audit", action="store_true", help="skip marking the records the relation gate fitted")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        manifest = build_validation(args.data, args.out, args.seed, holdout=args.holdout,
                                    holdout_seed=args.holdout_seed, audit_gate=not args.no_gate_audit)
    except EngramError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name, entry in manifest["splits"].items():
        where = Path(args.out) / entry["file"]
        print(f"validation:{name:<26} {entry['records']:>4} records  sha256 {entry['sha256']}  {where}")
    print(f"manifest: {Path(args.out) / MANIFEST}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
