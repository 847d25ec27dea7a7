"""Knowledge-editing benchmarks, read from any path into one `EditCase` type.

Formats (names for `load_dataset(..., format=...)`; "auto" detects them from the records' keys):
- `knowedit`: KnowEdit ZsRE-test-all, wiki_counterfact train/test, wiki_recent.
- `wikibio`: KnowEdit WikiBio (hallucination editing: passage -> continuation sentence).
- `zsre`: EasyEdit zsRE (`zsre_mend_eval_portability_gpt4`, `zsre_subject_replace`, `zsre_inverse_relation`).
- `counterfact`: EasyEdit CounterFact (`counterfact-edit.json`, `counterfact-val.json`).
- `rome`: ROME-format CounterFact (`counterfact_portability_gpt4.json`, `counterfact_subject_replace.json`).
- `mquake`: MQuAKE (`MQuAKE-hard.json`, and the CF-3k / T files, which share the schema).
- `dune`: DUnE (`new_info`, `scientific`, `arithmetic`, `debiasing_*` and their `*_locality` files).

Probe kinds are lower snake case: reasoning, subject_aliasing, logical_generalization, relation_specificity,
forgetfulness (KnowEdit); one_hop, subject_replace, inverse_relation, nq (zsRE); neighborhood (CounterFact);
multihop, single_hop (MQuAKE); dune_test, dune_biased, dune_locality (DUnE). A `dune_biased` answer is the
stereotyped answer the edit should move the model *away* from.

A named split, `validation:NAME`, stands for `validation-NAME.json` in $ENGRAM_SPLITS (default runs/splits),
as `python -m evaluation.splits` writes it (docs/validation.md).
"""
from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memory.errors import ValidationError

log = logging.getLogger(__name__)


@dataclass
class Probe:
    """A question with its accepted answers: `answers[0]` is canonical (used for teacher forcing)."""

    prompt: str
    answers: list[str]
    kind: str

    @property
    def answer(self) -> str:
        return self.answers[0] if self.answers else ""


@dataclass
class RequestedEdit:
    """One prompt -> target rewrite. MQuAKE cases carry several; other formats exactly one."""

    prompt: str
    subject: str
    target: str
    ground_truth: list[str] = field(default_factory=list)
    question: str | None = None  # MQuAKE's question form of the edit


@dataclass
class EditCase:
    """One benchmark case. For MQuAKE, prompt/subject/target repeat `edits[0]`."""

    case_id: str
    prompt: str
    subject: str
    target: str
    ground_truth: list[str] = field(default_factory=list)
    rephrases: list[str] = field(default_factory=list)
    portability: list[Probe] = field(default_factory=list)
    locality: list[Probe] = field(default_factory=list)
    multihop: list[Probe] = field(default_factory=list)  # one probe per paraphrased multi-hop question
    hops: list[Probe] = field(default_factory=list)  # MQuAKE's post-edit single-hop chain (cloze form)
    edits: list[RequestedEdit] = field(default_factory=list)
    text: str | None = None  # a natural-language statement of the edit (DUnE)
    generation_prompts: list[str] = field(default_factory=list)
    source: str = ""  # the format name
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # every editable case lists its edits, so a harness can iterate `edits` for any format
        if not self.edits and self.editable:
            self.edits = [RequestedEdit(self.prompt, self.subject, self.target, list(self.ground_truth))]

    @property
    def editable(self) -> bool:
        """True when the case has a prompt -> target edit (weight editors need one)."""
        return bool(self.prompt and self.target)


# ---------------------------------------------------------------------------------------------- helpers

def _str(rec: dict, key: str) -> str:
    value = rec[key]
    if not isinstance(value, str):
        raise TypeError(f"field {key!r} should be a string, got {type(value).__name__}")
    return value


def normalize_answers(value: Any) -> list[str]:
    """A probe's ground truth as a flat alias list.

    KnowEdit writes a string, a list of strings, or a list of alias lists (one list per accepted answer,
    e.g. [["actor", "actress"], ["film actor"]]). Every alias of every answer is accepted, so we flatten,
    keeping order (the first entry stays canonical) and dropping duplicates and blanks.
    """
    flat: list[str] = []

    def walk(v: Any) -> None:
        if isinstance(v, str):
            if v.strip() and v not in flat:
                flat.append(v)
        elif isinstance(v, (list, tuple)):
            for item in v:
                walk(item)
        elif v is not None:
            raise TypeError(f"answer should be a string or list, got {type(v).__name__}")

    walk(value)
    return flat


def _probes(section: Any, default_kind: str | None = None) -> list[Probe]:
    """KnowEdit's {Kind: [{prompt, ground_truth}]} section as probes; kinds become lower snake case."""
    if not section:
        return []
    if not isinstance(section, dict):
        raise TypeError(f"probe section should be an object, got {type(section).__name__}")
    out = []
    for kind, items in section.items():
        for item in items:
            answers = normalize_answers(item["ground_truth"])
            if not answers:  # wiki_counterfact has probes whose ground truth is [[]]: nothing to score
                log.debug("dropping a %s probe without an answer: %r", kind, item.get("prompt"))
                continue
            out.append(Probe(_str(item, "prompt"), answers, default_kind or kind.lower()))
    return out


def _fill(template: str, subject: str) -> str:
    # str.format would choke on any other brace in the prompt; replace only the slot
    return template.replace("{}", subject)


# ---------------------------------------------------------------------------------------------- loaders

def _load_knowedit(rec: dict, case_id: str) -> EditCase:
    rephrase = rec.get("rephrase_prompt")
    return EditCase(
        case_id=case_id, prompt=_str(rec, "prompt"), subject=_str(rec, "subject"), target=_str(rec, "target_new"),
        ground_truth=normalize_answers(rec.get("ground_truth")),  # absent in wiki_recent (insertions)
        rephrases=[rephrase] if isinstance(rephrase, str) and rephrase else [],
        portability=_probes(rec.get("portability")), locality=_probes(rec.get("locality")),
        source="knowedit")


def _load_wikibio(rec: dict, case_id: str) -> EditCase:
    return EditCase(case_id=case_id, prompt=_str(rec, "text"), subject=_str(rec, "concept"),
                    target=_str(rec, "labels"), locality=_probes(rec.get("locality")), source="wikibio")


def _load_zsre(rec: dict, case_id: str) -> EditCase:
    port: list[Probe] = []
    if isinstance(rec.get("portability"), dict):
        p = rec["portability"]
        port.append(Probe(_str(p, "New Question"), normalize_answers(p["New Answer"]), "one_hop"))
    if "alter_subject_question" in rec:
        port.append(Probe(_str(rec, "alter_subject_question"), [_str(rec, "alt")], "subject_replace"))
    if "inverse question" in rec:
        port.append(Probe(_str(rec, "inverse question"), [_str(rec, "subject")], "inverse_relation"))
    loc = [Probe(_str(rec, "loc"), normalize_answers(rec["loc_ans"]), "nq")] if rec.get("loc") else []
    meta = {k: rec[k] for k in ("pred", "cond", "alternative_subject") if k in rec}
    return EditCase(case_id=case_id, prompt=_str(rec, "src"), subject=_str(rec, "subject"), target=_str(rec, "alt"),
                    ground_truth=normalize_answers(rec.get("answers")), rephrases=[_str(rec, "rephrase")],
                    portability=port, locality=loc, source="zsre", meta=meta)


def _load_counterfact(rec: dict, case_id: str) -> EditCase:
    loc = [Probe(_str(rec, "locality_prompt"), normalize_answers(rec["locality_ground_truth"]), "neighborhood")]
    return EditCase(case_id=case_id, prompt=_str(rec, "prompt"), subject=_str(rec, "subject"),
                    target=_str(rec, "target_new"), ground_truth=normalize_answers(rec["ground_truth"]),
                    rephrases=[_str(rec, "rephrase_prompt")], locality=loc, source="counterfact")


def _load_rome(rec: dict, case_id: str) -> EditCase:
    rw = rec["requested_rewrite"]
    subject, target = _str(rw, "subject"), _str(rw["target_new"], "str")
    truth = _str(rw["target_true"], "str")
    port: list[Probe] = []
    if isinstance(rec.get("portability"), dict):
        p = rec["portability"]
        port.append(Probe(_str(p, "New Question"), normalize_answers(p["New Answer"]), "one_hop"))
    if rec.get("alternative_subject"):
        port.append(Probe(_fill(_str(rw, "prompt"), _str(rec, "alternative_subject")), [target], "subject_replace"))
    # ROME's neighbourhood prompts share the relation and the true object: their answer must stay target_true
    loc = [Probe(p, [truth], "neighborhood") for p in rec.get("neighborhood_prompts", [])]
    return EditCase(case_id=case_id, prompt=_fill(_str(rw, "prompt"), subject), subject=subject, target=target,
                    ground_truth=[truth], rephrases=list(rec.get("paraphrase_prompts", [])), portability=port,
                    locality=loc, generation_prompts=list(rec.get("generation_prompts", [])), source="rome",
                    meta={"relation_id": rw.get("relation_id")})


def _load_mquake(rec: dict, case_id: str) -> EditCase:
    edits = [RequestedEdit(prompt=_fill(_str(rw, "prompt"), _str(rw, "subject")), subject=_str(rw, "subject"),
                           target=_str(rw["target_new"], "str"), ground_truth=[_str(rw["target_true"], "str")],
                           question=rw.get("question"))
             for rw in rec["requested_rewrite"]]
    if not edits:
        raise ValueError("requested_rewrite is empty")
    new_answers = normalize_answers([rec["new_answer"], rec.get("new_answer_alias", [])])
    multihop = [Probe(q, new_answers, "multihop") for q in rec["questions"]]
    hops = [Probe(_str(h, "cloze"), normalize_answers([h["answer"], h.get("answer_alias", [])]), "single_hop")
            for h in rec.get("new_single_hops", [])]
    first = edits[0]
    meta = {"answer": normalize_answers([rec.get("answer"), rec.get("answer_alias", [])])}  # pre-edit answer
    return EditCase(case_id=case_id, prompt=first.prompt, subject=first.subject, target=first.target,
                    ground_truth=first.ground_truth, multihop=multihop, hops=hops, edits=edits, source="mquake",
                    meta=meta)


def _dune_probes(test: Any, kind: str, edit: str) -> list[Probe]:
    if isinstance(test, str):  # arithmetic: a word problem whose answer is the edit's right-hand side
        return [Probe(test, [edit.rsplit("=", 1)[-1].strip()], kind)]
    if len(test) == 2 and all(isinstance(x, str) for x in test):  # scientific: [question, letter]
        test = [test]
    probes = []
    for item in test:
        if len(item) != 2:  # debiasing_II has two garbled few-shot triples upstream; they test nothing
            log.warning("skipping a DUnE test input with %d fields, not [query, answer]", len(item))
            continue
        probes.append(Probe(_str_item(item[0]), [_str_item(item[1])], kind))
    return probes


def _str_item(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def _load_dune(data: dict, path: Path, limit: int | None) -> list[EditCase]:
    edits = data.get("edits", data.get("edits:"))  # debiasing_I.json spells the key "edits:"
    tests = data["test_inputs"]
    if not isinstance(edits, list) or not isinstance(tests, list) or len(edits) != len(tests):
        raise ValidationError(f"{path}: DUnE 'edits' and 'test_inputs' must be lists of equal length")
    is_locality = path.stem.endswith("_locality")
    biased = "debias" in path.stem.lower() or "edits:" in data or "edit_prompt" in data
    kind = "dune_locality" if is_locality else ("dune_biased" if biased else "dune_test")
    cases = []
    for i, (edit, test) in enumerate(list(zip(edits, tests))[:limit]):
        try:
            probes = _dune_probes(test, kind, _str_item(edit))
        except (TypeError, ValueError) as exc:
            raise ValidationError(f"{path}: DUnE record {i} is malformed: {exc}") from exc
        prompt = target = ""
        match = re.fullmatch(r"\s*(.+?)\s*=\s*(\S.*?)\s*", edit)
        if match and not is_locality and isinstance(test, str):  # arithmetic "lhs = rhs"
            prompt, target = match.group(1) + " =", match.group(2)
        case = EditCase(case_id=f"{path.stem}-{i}", prompt=prompt, subject="", target=target,
                        text=edit or None, source="dune")
        (case.locality if is_locality else case.portability).extend(probes)
        cases.append(case)
    return cases


RecordLoader = Callable[[dict, str], EditCase]
LOADERS: dict[str, RecordLoader] = {
    "knowedit": _load_knowedit, "wikibio": _load_wikibio, "zsre": _load_zsre,
    "counterfact": _load_counterfact, "rome": _load_rome, "mquake": _load_mquake,
}
FORMATS = (*LOADERS, "dune")
EXPECTED = (
    "a JSON list of KnowEdit records (subject, prompt, target_new), WikiBio (text, labels, concept), "
    "EasyEdit zsRE (src, alt, rephrase), CounterFact (prompt, target_new, rephrase_prompt, locality_prompt), "
    "ROME/CounterFact (requested_rewrite object), MQuAKE (requested_rewrite list, questions), "
    "or a DUnE object with 'edits' and 'test_inputs'"
)


# ---------------------------------------------------------------------------------------------- public API

SPLIT_PREFIX = "validation:"
SPLITS_ENV = "ENGRAM_SPLITS"
DEFAULT_SPLITS_DIR = Path(__file__).resolve().parents[1] / "runs" / "splits"  # git-ignored: data stays out of the repo
MANIFEST = "validation-manifest.json"


def split_file(name: str, splits_dir: str | Path | None = None) -> Path:
    """Where the validation split NAME is written (evaluation.splits) and read."""
    return Path(splits_dir or os.environ.get(SPLITS_ENV) or DEFAULT_SPLITS_DIR) / f"validation-{name}.json"


def resolve_dataset(path: str | Path) -> Path:
    """`validation:NAME` -> its split file (which must exist); any other value is a path as it is."""
    text = str(path)
    if not text.startswith(SPLIT_PREFIX):
        return Path(path)
    name = text[len(SPLIT_PREFIX):]
    file = split_file(name)
    if not name or not file.exists():
        made = sorted(p.name[len("validation-"):-len(".json")] for p in file.parent.glob("validation-*.json")
                      if p.name != MANIFEST)
        raise ValidationError(f"validation split {name!r} not found at {file} (built: {', '.join(made) or 'none'}); "
                              f"build it with `python -m evaluation.splits --data ../shared/data --out {file.parent}` "
                              f"(or set {SPLITS_ENV})")
    return file


def _read(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValidationError(f"cannot read dataset {path}: {exc.strerror or exc}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as first_error:
        try:  # JSON Lines: one record per non-blank line
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError:
            raise ValidationError(f"{path} is neither JSON nor JSON Lines ({first_error}); "
                                  f"expected {EXPECTED}") from first_error


def _detect(data: Any, path: Path) -> str:
    if isinstance(data, dict):
        if "test_inputs" in data and ("edits" in data or "edits:" in data):
            return "dune"
        raise ValidationError(f"{path}: a JSON object with keys {sorted(data)[:8]} matches no format; "
                              f"expected {EXPECTED}")
    if not isinstance(data, list) or not data:
        raise ValidationError(f"{path}: no records found; expected {EXPECTED}")
    rec = data[0]
    if not isinstance(rec, dict):
        raise ValidationError(f"{path}: records are {type(rec).__name__}, not objects; expected {EXPECTED}")
    keys = set(rec)
    rewrite = rec.get("requested_rewrite")
    if isinstance(rewrite, list) and "questions" in keys:
        return "mquake"
    if isinstance(rewrite, dict):
        return "rome"
    if {"src", "alt", "rephrase"} <= keys:
        return "zsre"
    if {"text", "labels", "concept"} <= keys:
        return "wikibio"
    if {"prompt", "target_new", "rephrase_prompt", "locality_prompt"} <= keys:
        return "counterfact"
    if {"subject", "prompt", "target_new"} <= keys:
        return "knowedit"
    raise ValidationError(f"{path}: the first record has keys {sorted(keys)[:12]}, which match no format; "
                          f"expected {EXPECTED}")


def detect_format(path: str | Path) -> str:
    """The format name of a benchmark file, from its records' keys. Raises ValidationError if none fits."""
    path = resolve_dataset(path)
    return _detect(_read(path), path)


def load_dataset(path: str | Path, format: str = "auto", limit: int | None = None) -> list[EditCase]:
    """Read a benchmark file (or a `validation:NAME` split) into EditCases. `limit` keeps the first N records
    (edits, for DUnE)."""
    path = resolve_dataset(path)
    if format != "auto" and format not in FORMATS:
        raise ValidationError(f"unknown dataset format {format!r}: use auto or one of {', '.join(FORMATS)}")
    if limit is not None and limit < 0:
        raise ValidationError(f"limit must be >= 0, got {limit}")
    data = _read(path)
    fmt = _detect(data, path) if format == "auto" else format
    if fmt == "dune":
        if not isinstance(data, dict):
            raise ValidationError(f"{path}: DUnE data is an object with 'edits' and 'test_inputs'")
        try:
            cases = _load_dune(data, path, limit)
        except KeyError as exc:
            raise ValidationError(f"{path}: not DUnE data: missing field {exc}") from exc
    else:
        if not isinstance(data, list):
            raise ValidationError(f"{path}: {fmt} data is a JSON list of records")
        cases = [_load_record(LOADERS[fmt], rec, i, path, fmt) for i, rec in enumerate(data[:limit])]
    log.info("loaded %d %s cases from %s", len(cases), fmt, path)
    return cases


def _load_record(loader: RecordLoader, rec: Any, index: int, path: Path, fmt: str) -> EditCase:
    if not isinstance(rec, dict):
        raise ValidationError(f"{path}: record {index} is {type(rec).__name__}, not an object")
    case_id = str(rec["case_id"]) if "case_id" in rec else f"{path.stem}-{index}"
    try:
        case = loader(rec, case_id)
    except KeyError as exc:
        raise ValidationError(f"{path}: record {index} is not {fmt} data: missing field {exc}") from exc
    except (TypeError, ValueError, AttributeError) as exc:
        raise ValidationError(f"{path}: record {index} is not valid {fmt} data: {exc}") from exc
    if not case.prompt or not case.target:
        raise ValidationError(f"{path}: record {index} ({fmt}) has an empty prompt or target")
    return case
