"""The shared vocabulary of fact extraction: the result type, the text normalisation, the gate that refuses
sentences whose claim cannot be stated as a cloze, and the check every proposal (rules or LLM) must pass.

A proposal is accepted only when it is *grounded* in the sentence:
- the subject and the target occur in the text (case- and whitespace-blind), and neither is cut from a
  longer name ("Northwind" from "Northwind Traders");
- the prompt contains the subject, does not contain the target, and ends before it (no final punctuation);
- prompt + " " + target restates the sentence: every content word of the prompt occurs in the text.
The last rule is a cheap stand-in for entailment. It lets "Zorbia's capital is Quellmarsh." become
"The capital of Zorbia is" + "Quellmarsh", and it stops an LLM that adds words the sentence never said.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, replace

from memory.facts import MAX_LEN

METHODS = ("rules", "openai", "local")
MAX_TARGET_WORDS = 8  # longer tails are clauses, not answers an edit can learn
MAX_SUBJECT_WORDS = 10

# Words that carry no claim of their own: a prompt may add these without changing what the sentence says.
STOPWORDS = frozenset(
    "a an the of in on at to for by from with as and or is are was were be been being has have had "
    "do does did that this which who whom whose its it's his her their s".split())
_NEGATION = re.compile(r"\b(?:not|never|no|nobody|nothing|neither|nor|cannot)\b|n't\b|n’t\b", re.I)
_HEDGE = re.compile(r"\b(?:maybe|perhaps|probably|possibly|might|could|would|should|allegedly|supposedly|"
                    r"rumou?red|i think|i guess|i believe|i suppose|i wonder|if|unless|whether)\b", re.I)
_QUOTES = "\"'“”‘’`"


@dataclass(frozen=True)
class Extraction:
    """One sentence's fact, or the reason it has none (`ok` is False, the four fields are None).

    `method` is how the fields were found (rules | openai | local), `generator` the exact source (e.g.
    "openai:gpt-4o-mini"). `reason` explains a "none", or notes why an LLM proposal was overruled."""

    subject: str | None = None
    relation: str | None = None
    prompt: str | None = None
    target: str | None = None
    method: str | None = None
    generator: str | None = None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.prompt is not None and self.target is not None

    @property
    def status(self) -> str:
        return "ok" if self.ok else "none"

    def with_reason(self, reason: str | None) -> Extraction:
        return replace(self, reason=reason)

    @classmethod
    def none(cls, reason: str, generator: str | None = None) -> Extraction:
        return cls(reason=reason, generator=generator)


# -------------------------------------------------------------------------------------------- normalising
def clean(text: str) -> str:
    """NFC, straight apostrophes, single spaces, no edge quotes: the form every pattern and check reads."""
    text = unicodedata.normalize("NFC", text).replace("’", "'").replace("‘", "'")
    text = " ".join(text.split())
    while len(text) >= 2 and text[0] in _QUOTES and text[-1] in _QUOTES:
        text = text[1:-1].strip()
    return text


def strip_final(text: str) -> str:
    """Without final punctuation: "Quellmarsh." -> "Quellmarsh"."""
    return text.rstrip(" .!;:,").strip()


def norm(text: str | None) -> str:
    """The comparison key: case, whitespace, apostrophe style and final punctuation do not count."""
    return strip_final(clean(text or "")).casefold()


def _words(text: str) -> list[str]:
    text = re.sub(r"'s\b", " ", clean(text).casefold())  # "Zorbia's" -> "zorbia"
    return re.findall(r"\w+", text)


def contains(text: str, part: str) -> bool:
    """`part` occurs in `text` on word boundaries (case-blind), so "Rome" is not found in "Romeo"."""
    return re.search(rf"(?<!\w){re.escape(norm(part))}(?!\w)", norm(text)) is not None


def cut_from_name(text: str, part: str) -> bool:
    """`part` occurs in `text` only as the start of a longer name: "Northwind" in "Northwind Traders is"."""
    found = list(re.finditer(rf"(?<!\w){re.escape(clean(part))}(?!\w)", clean(text), re.I))
    return bool(found) and all(re.match(r" [A-Z]", clean(text)[m.end():]) for m in found)


def _same_word(a: str, b: str) -> bool:
    """Equal, or one a stem of the other ("located"/"locate", "languages"/"language")."""
    return a == b or (min(len(a), len(b)) >= 4 and (a.startswith(b) or b.startswith(a)))


# ------------------------------------------------------------------------------------------------- gates
def claim_gate(sentence: str) -> str | None:
    """Why the sentence states no plain claim (a question, a negation, a hedge), or None if it may.
    Conservative on purpose: a wrong fact in shared weights costs more than a text fact in the pool."""
    text = clean(sentence)
    if not re.search(r"\w", text):
        return "the text has no words"
    if text.rstrip().endswith("?"):
        return "a question states no fact"
    if _NEGATION.search(text):
        return "a negated sentence: its cloze would state the opposite"
    if _HEDGE.search(text) or re.search(r"(?<!^)\bmay\b", text):  # "May" opening a sentence is a name
        return "a hedged or conditional sentence states no plain fact"
    return None


def check_fields(text: str, subject: str | None, relation: str | None, prompt: str | None,
                 target: str | None) -> str | None:
    """Why a proposal is not grounded in `text` (see the module docstring), or None if it is."""
    values = {"subject": subject, "relation": relation, "prompt": prompt, "target": target}
    for name, value in values.items():
        if not isinstance(value, str) or not value.strip():
            return f"no {name}"
        if len(value) > MAX_LEN[name]:
            return f"the {name} is too long ({len(value)} > {MAX_LEN[name]} characters)"
    if not contains(text, subject):
        return f"the subject {subject!r} is not in the text"
    if not contains(text, target):
        return f"the target {target!r} is not in the text"
    for name, value in (("subject", subject), ("target", target)):
        if cut_from_name(text, value):
            return f"the {name} {value!r} is cut from a longer name"
    if norm(subject) == norm(target) or contains(subject, target) or contains(target, subject):
        return "the subject and the target overlap"
    if len(target.split()) > MAX_TARGET_WORDS:
        return f"the target has more than {MAX_TARGET_WORDS} words"
    if not contains(prompt, subject):
        return f"the prompt {prompt!r} does not contain the subject"
    if contains(prompt, target):
        return f"the prompt {prompt!r} contains the target"
    if clean(prompt)[-1:] in ".!?;:,":
        return "the prompt does not end before the target"
    said = _words(text)
    added = [w for w in _words(prompt) if w not in STOPWORDS and not any(_same_word(w, s) for s in said)]
    if added:
        return f"prompt + target does not restate the sentence (it adds {', '.join(added[:3])!s})"
    return None
