"""Field-level scoring of fact extraction against sentences with their expected fields (a JSONL file:
tests/fixtures/extraction_sentences.jsonl). Used by scripts/measure_extraction.py and the regression test.

A case is {"kind", "text", "subject", "relation", "prompt", "target", "accept"?}; the four fields are null
when the sentence states no fact, and "accept" lists other acceptable values per field. Comparison is
exact after normalising case, whitespace, apostrophes and final punctuation (base.norm). A prompt also
counts when prompt + " " + target restates the sentence word for word.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from agent.extract.base import Extraction, norm

SCORED = ("subject", "target", "prompt", "relation")


@dataclass
class Case:
    kind: str
    text: str
    expected: dict
    accept: dict

    @property
    def has_fact(self) -> bool:
        return self.expected.get("target") is not None


@dataclass
class Score:
    cases: int = 0
    facts: int = 0  # cases with an expected fact
    correct: dict = field(default_factory=lambda: {k: 0 for k in SCORED + ("all",)})
    nothing_expected: int = 0
    nothing_correct: int = 0  # "nothing" answered where nothing was expected
    missed: int = 0  # "nothing" answered where a fact was expected
    invented: int = 0  # a fact answered where nothing was expected
    seconds: float = 0.0
    methods: dict = field(default_factory=dict)  # how each sentence was answered: rules | local | openai | none
    right_by_method: dict = field(default_factory=dict)  # sentences with a fact, all three fields right
    misses: list = field(default_factory=list)  # (case, extraction, wrong fields)

    def rate(self, name: str) -> float:
        return self.correct[name] / self.facts if self.facts else 0.0

    def as_dict(self) -> dict:
        return {"cases": self.cases, "facts": self.facts, **{k: round(self.rate(k), 3) for k in self.correct},
                "nothing_correct": self.nothing_correct, "nothing_expected": self.nothing_expected,
                "missed": self.missed, "invented": self.invented, "methods": self.methods,
                "right_by_method": self.right_by_method, "seconds": round(self.seconds, 3),
                "seconds_per_sentence": round(self.seconds / max(1, self.cases), 4)}


def load_cases(path: str | Path) -> list[Case]:
    cases = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            row = json.loads(line)
            expected = {k: row.get(k) for k in ("subject", "relation", "prompt", "target")}
            cases.append(Case(row.get("kind", "?"), row["text"], expected, row.get("accept") or {}))
    return cases


def _matches(case: Case, name: str, value: str | None) -> bool:
    wanted = [case.expected[name]] + list(case.accept.get(name, []))
    return value is not None and norm(value) in {norm(w) for w in wanted if w is not None}


def wrong_fields(case: Case, got: Extraction) -> list[str]:
    """The scored fields `got` has wrong for a case with a fact ("all" is not listed)."""
    wrong = [k for k in ("subject", "target", "relation") if not _matches(case, k, getattr(got, k))]
    restates = got.ok and norm(f"{got.prompt} {got.target}") == norm(case.text)
    if not (_matches(case, "prompt", got.prompt) or restates):
        wrong.append("prompt")
    return wrong


def score(cases: list[Case], extract: Callable[[str], Extraction]) -> Score:
    result = Score(cases=len(cases))
    for case in cases:
        start = time.perf_counter()
        got = extract(case.text)
        result.seconds += time.perf_counter() - start
        method = got.method or "none"
        result.methods[method] = result.methods.get(method, 0) + 1
        if not case.has_fact:
            result.nothing_expected += 1
            if got.ok:
                result.invented += 1
                result.misses.append((case, got, ["invented"]))
            else:
                result.nothing_correct += 1
            continue
        result.facts += 1
        if not got.ok:
            result.missed += 1
        wrong = wrong_fields(case, got) if got.ok else list(SCORED)
        for name in SCORED:
            result.correct[name] += name not in wrong
        right = not ({"subject", "target", "prompt"} & set(wrong))
        result.correct["all"] += right
        result.right_by_method[method] = result.right_by_method.get(method, 0) + right
        if wrong:
            result.misses.append((case, got, wrong))
    return result
