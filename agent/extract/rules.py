"""Rules for the common sentence shapes of a fact: no model, microseconds a sentence, and conservative
(a rule that is unsure yields nothing, and the sentence stays a text fact).

Shapes, tried in this order on each sentence (the first that yields wins):
    "The R of X is Y."         subject X, prompt "The R of X is", target Y
    "X's R is Y."              subject X, prompt "The R of X is", target Y
    "Y is the R of X."         subject X, prompt "The R of X is", target Y
        (one canonical prompt and subject for the three, so a newer phrasing supersedes an older one)
    "X was born in Y.", "X is located in Y.", "X speaks Y.", "X works for Y.", "X plays Y.", "X was
    written by Y." and the like: prompt = the sentence up to Y, as written
    "X is a Y."                the last resort: prompt "X is a", target Y

A subject must look like a name (capitalised or a number; a leading "The" is dropped, so "The Eiffel
Tower" is scoped by "Eiffel Tower"), never a pronoun. A target is cut at the first comma, bracket or
relative clause, and at a trailing "in 1950"-style time adjunct.
"""
from __future__ import annotations

import re

from agent.extract.base import MAX_SUBJECT_WORDS, MAX_TARGET_WORDS, Extraction, check_fields, claim_gate, clean

GENERATOR = "rules"
_BE = r"(?P<verb>is|was|are|were)"
_REL = r"(?P<rel>[\w'-]+(?: [\w'-]+){0,3}?)"  # one to four words
_THE_R_OF = re.compile(rf"^(?:The|the) {_REL} of (?P<subj>.+?) {_BE} (?P<tgt>.+)$")
_POSSESSIVE = re.compile(rf"^(?P<subj>.+?)(?:'s|(?<=s)') {_REL} {_BE} (?P<tgt>.+)$")
_IS_THE_R_OF = re.compile(rf"^(?P<tgt>.+?) (?P<verb>is|was) the {_REL} of (?P<subj>.+)$")
_IS_A = re.compile(r"^(?P<subj>.+?) (?P<phrase>(?:is|was) an?) (?P<tgt>.+)$")
_PASSIVE = re.compile(r"^(?P<subj>.+?) (?P<phrase>(?:is|was|are|were) (?P<participle>\w+(?:ed|en|wn|lt|de)) "
                      r"(?P<prep>by|in|at|on|from|to|for|with))\s(?P<tgt>.+)$")

# Verb phrases and the relation each names; "place|date" picks by whether the target is a date.
VERB_PHRASES: tuple[tuple[str, str], ...] = (
    (r"(?:was|were) born in", "place of birth|date of birth"),
    (r"(?:was|were) born on", "date of birth"),
    (r"died in", "place of death|date of death"),
    (r"(?:is|was|are|were) (?:located|situated) in", "location"),
    (r"lies in", "location"),
    (r"(?:is|was|are|were) (?:based|headquartered) in", "headquarters"),
    (r"(?:lives|lived|resides|resided) in", "residence"),
    (r"(?:speaks|spoke)", "language"),
    (r"(?:works|worked) (?:for|at)", "employer"),
    (r"(?:works|worked) as an?", "occupation"),
    (r"(?:plays|played) for", "team"),
    (r"(?:plays|played) the", "instrument"),
    (r"(?:plays|played)", "plays"),
    (r"(?:is|was) married to", "spouse"),
    (r"(?:is|was) (?:a )?(?:citizen|national) of", "citizenship"),
    (r"(?:is|was|are|were) from", "origin"),
    (r"(?:comes|came) from", "origin"),
    (r"(?:studied|studies) at", "educated at"),
    (r"graduated from", "educated at"),
    (r"(?:is|was|are|were) (?:a )?member of", "member of"),
    (r"(?:is|was|are|were) part of", "part of"),
    (r"(?:is|was|are|were) (?:known|famous) for", "known for"),
    (r"belongs to", "owned by"),
    (r"borders", "shares border with"),
    (r"(?:is|was|are|were) in", "location"),
)
_PHRASES = [(re.compile(rf"^(?P<subj>.+?) (?P<phrase>{p}) (?P<tgt>.+)$"), rel) for p, rel in VERB_PHRASES]
_PARTICIPLE_RELATIONS = {("written", "by"): "author", ("directed", "by"): "director", ("composed", "by"): "composer",
                         ("painted", "by"): "painter", ("invented", "by"): "inventor", ("founded", "by"): "founder",
                         ("founded", "in"): "founded", ("created", "by"): "creator", ("designed", "by"): "designer",
                         ("developed", "by"): "developer", ("discovered", "by"): "discoverer",
                         ("owned", "by"): "owned by", ("made", "by"): "manufacturer",
                         ("manufactured", "by"): "manufacturer", ("produced", "by"): "producer",
                         ("built", "by"): "builder", ("named", "after"): "named after"}

_PRONOUNS = frozenset("i you he she it we they this that these those there here someone somebody everyone "
                      "everybody anyone people one who what which my your our his her their its".split())
_ABBREVIATIONS = frozenset("mr mrs ms dr prof st mt jr sr inc ltd co corp vs no fig gen col lt sgt rev".split())
_TARGET_CUT = re.compile(r",|;|\s\(|\s[-–—]\s|\s(?:which|who|whom|whose|where|when|while|because|since|although|"
                         r"but|and then|after|before)\s")
_TIME_TAIL = re.compile(r"\s(?:in|since|from|until|during|on|by)\s(?:the\s)?(?:early\s|late\s)?\d{3,4}s?\b.*$")
_LEADING_YEAR = re.compile(r"^(\d{3,4})\s(?:by|in|at|on|from|with|as)\s.*$")
_DATE = re.compile(r"^(?:(?:\d{1,2}\s)?(?:January|February|March|April|May|June|July|August|September|October|"
                   r"November|December)(?:\s\d{1,2})?,?\s)?\d{3,4}$|^\d{1,2}\s\w+\s\d{4}$")


def split_sentences(text: str) -> list[str]:
    """Split on . ! ? followed by a capital, but not after "Dr." or an initial like "J."."""
    parts, start = [], 0
    for match in re.finditer(r"[.!?]\s+(?=[A-Z0-9\"'])", text):
        before = text[start:match.start()].split()
        last = before[-1].rstrip(".").casefold() if before else ""
        if text[match.start()] == "." and (last in _ABBREVIATIONS or len(last) == 1):
            continue
        parts.append(text[start:match.end()].strip())
        start = match.end()
    parts.append(text[start:].strip())
    return [p for p in parts if p]


_OWNED = re.compile(r"(?:'s|(?<=s)') (?P<owned>[a-z][\w -]*)$")


def _owned(raw: str) -> str | None:
    """What a possessive subject owns: "brother" of "Ana Vex's brother"."""
    m = _OWNED.search(raw.strip())
    return m.group("owned") if m else None


def _subject(raw: str) -> str | None:
    """The name in `raw`, or None if it is no name (a pronoun, a common noun, a clause). Of "Ana Vex's
    brother" it is the owner, "Ana Vex": the prompt keeps the rest, and the relation names it."""
    subject = _OWNED.sub("", re.sub(r"^(?:The|the)\s+", "", raw.strip()))
    words = subject.split()
    if not words or len(words) > MAX_SUBJECT_WORDS or any(c in subject for c in ",;:()"):
        return None
    if words[0].casefold() in _PRONOUNS or not (words[0][0].isupper() or words[0][0].isdigit()):
        return None
    return subject


def _target(raw: str) -> str | None:
    target = _TARGET_CUT.split(raw, maxsplit=1)[0].strip()
    target = _LEADING_YEAR.sub(r"\1", target)  # "founded in 1975 by Bill Gates": the year is the answer
    if not _DATE.match(target):
        target = _TIME_TAIL.sub("", target).strip()
    target = target.rstrip(" .!;:,'\"").strip()
    if not target or not re.match(r"[\w\"'$£€]", target) or len(target.split()) > MAX_TARGET_WORDS:
        return None
    return target


def _relation(rel: str) -> str:
    """Plain lower case, but acronyms ("CEO") stay as written."""
    return " ".join(w if w.isupper() and len(w) > 1 else w.casefold() for w in rel.split())


_NOT_AN_ANSWER = re.compile(r"^(?:in|at|on|by|from|to|for|with|of|located|situated|based|known|famous|made|"
                            r"\w+ed)\b")


def _lowercase_words(rel: str) -> bool:
    """A relation is common words ("capital", "mother tongue") or an acronym ("CEO"); a capitalised word
    is part of a name ("The University of Zorbia"), not a relation."""
    return all(w.islower() or (w.isupper() and len(w) > 1) for w in rel.split())


def _canonical(match: re.Match, subj_raw: str, tgt_raw: str, at_start: bool) -> tuple | None:
    """("The R of X is" family) -> (subject, relation, prompt, target) or None. A subject that opened the
    sentence loses its capital "The" inside the prompt: "The height of the Eiffel Tower is"."""
    subject, target, rel = _subject(subj_raw), _target(tgt_raw), match.group("rel")
    if subject is None or target is None or not _lowercase_words(rel) or _NOT_AN_ANSWER.match(target):
        return None
    raw = subj_raw.strip()
    embedded = "the " + raw[4:] if at_start and raw.startswith("The ") else raw
    prompt = f"The {rel} of {embedded} {match.group('verb')}"
    return subject, _relation(rel), prompt, target


def _the_r_of(s: str) -> tuple | None:
    m = _THE_R_OF.match(s)
    return _canonical(m, m.group("subj"), m.group("tgt"), at_start=False) if m else None


def _possessive(s: str) -> tuple | None:
    m = _POSSESSIVE.match(s)
    return _canonical(m, m.group("subj"), m.group("tgt"), at_start=True) if m else None


def _is_the_r_of(s: str) -> tuple | None:
    m = _IS_THE_R_OF.match(s)
    if not m or _subject(m.group("tgt")) is None:  # the answer must be a name too: "Quellmarsh is the ..."
        return None
    return _canonical(m, m.group("subj"), m.group("tgt"), at_start=False)


def _verbatim(s: str, m: re.Match, relation: str) -> tuple | None:
    """Prompt = the sentence up to the target, as written."""
    subject, target = _subject(m.group("subj")), _target(m.group("tgt"))
    if subject is None or target is None:
        return None
    if "|" in relation:  # place or date, by what the target is
        place, date = relation.split("|")
        relation = date if _DATE.match(target) else place
    if owned := _owned(m.group("subj")):  # "Ana Vex's brother lives in": not Ana Vex's own residence
        relation = f"{owned}'s {relation}"
    return subject, relation, s[:m.start("tgt")].rstrip(), target


def _verb_phrase(s: str) -> tuple | None:
    """The phrase that starts earliest wins (the shortest subject); "plays for" beats "plays" by order."""
    best = None
    for pattern, relation in _PHRASES:
        m = pattern.match(s)
        if m and (best is None or m.start("phrase") < best[0].start("phrase")):
            best = (m, relation)
    m = _PASSIVE.match(s)
    if m and (best is None or m.start("phrase") < best[0].start("phrase")):
        key = (m.group("participle").casefold(), m.group("prep").casefold())
        best = (m, _PARTICIPLE_RELATIONS.get(key, f"{key[0]} {key[1]}"))
    return _verbatim(s, *best) if best else None


def _is_a(s: str) -> tuple | None:
    m = _IS_A.match(s)
    return _verbatim(s, m, "instance of") if m else None


SHAPES = (_the_r_of, _possessive, _is_the_r_of, _verb_phrase, _is_a)


def _sentence(sentence: str) -> tuple[tuple | None, str]:
    """(fields, reason) for one sentence: fields when a shape yields and passes the grounding check."""
    gate = claim_gate(sentence)
    if gate:
        return None, gate
    s = sentence.rstrip(" .!").strip()
    for shape in SHAPES:
        fields = shape(s)
        if fields is not None:
            problem = check_fields(sentence, *fields)
            if problem is None:
                return fields, ""
    return None, "no common sentence pattern matches"


def extract_by_rules(text: str) -> Extraction:
    """The first sentence of `text` that a rule can read, as an Extraction; else the first reason why not."""
    reasons = []
    for sentence in split_sentences(clean(text)):
        fields, reason = _sentence(sentence)
        if fields is not None:
            subject, relation, prompt, target = fields
            return Extraction(subject, relation, prompt, target, method="rules", generator=GENERATOR)
        reasons.append(reason)
    return Extraction.none(f"rules: {reasons[0] if reasons else 'the text is empty'}", GENERATOR)
