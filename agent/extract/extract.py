"""extract_fact: a sentence in, its subject, relation, cloze prompt and target out (or the reason why not).

Order (ExtractConfig.rules_first decides; None = by backend, chosen by scripts/measure_extraction.py):
- OpenAI-compatible generator: the LLM first, the rules as the fallback. A capable model reads shapes
  no rule knows ("In 2020, Ana Vex moved to Brellin."), and one request per text fact is cheap.
- local model (SmolLM2-135M by default): the rules first, the model only for what they cannot read.
  Measured on the 50 sentences (scripts/measure_extraction.py, busy 2-CPU machine): model first scored
  38/43 facts fully right at ~6.8 s a sentence, and only 6 of its 50 proposals passed the checks (5 of
  them right); rules first scored 39/43 at 0.3 ms a sentence for what the rules read.
- neither: the rules alone.
Whatever proposes, the fields must pass base.check_fields against the sentence they came from, and that
sentence must pass base.claim_gate (no question, negation or hedge). An LLM proposal that fails is
rejected, the rules are tried, and the reason is kept on the result. Never raises for a bad reply or an
unreachable server: a sentence that yields nothing stays a text fact.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from agent.extract.base import Extraction, check_fields, claim_gate, clean, contains, strip_final
from agent.extract.llm import ExtractionLLM, extractor_for, parse_reply
from agent.extract.rules import extract_by_rules, split_sentences
from memory.errors import EngramError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractConfig:
    """rules_first: True = rules, then the LLM for misses; False = the LLM, then the rules; None = by
    backend (rules first for the local model, the LLM first for an OpenAI-compatible server)."""

    rules_first: bool | None = None


def _claim_sentence(text: str, subject: str, target: str) -> str:
    """The sentence of `text` that holds both the subject and the target (the whole text if none does)."""
    for sentence in split_sentences(text):
        if contains(sentence, subject) and contains(sentence, target):
            return sentence
    return text


def proposal_from_llm(text: str, llm: ExtractionLLM) -> Extraction:
    """The LLM's validated proposal, or a "none" whose reason says what went wrong."""
    try:
        reply = llm.propose(text)
    except EngramError as exc:
        return Extraction.none(f"{llm.name}: {exc}", llm.name)
    except Exception as exc:  # noqa: BLE001 - a generator must never block the loop
        return Extraction.none(f"{llm.name}: {type(exc).__name__}: {exc}", llm.name)
    try:
        fields = parse_reply(reply)
    except ValueError as exc:
        return Extraction.none(f"{llm.name}: {exc}", llm.name)
    if "none" in fields:
        return Extraction.none(f"{llm.name} found no fact: {fields['none']}", llm.name)
    subject, relation = clean(fields["subject"]), clean(fields["relation"])
    prompt, target = clean(fields["prompt"]), strip_final(clean(fields["target"]))
    problem = check_fields(text, subject, relation, prompt, target)
    if problem is None:
        problem = claim_gate(_claim_sentence(text, subject, target))
    if problem is not None:
        log.debug("%s proposal for %r rejected: %s", llm.name, text, problem)
        return Extraction.none(f"{llm.name} proposal rejected: {problem}", llm.name)
    return Extraction(subject, relation, prompt, target, method=llm.method, generator=llm.name)


def extract_fact(text: str, generator=None, config: ExtractConfig | None = None) -> Extraction:
    """The fact that `text` states. `generator`: None (rules only), an ExtractionLLM, a context generator
    from agent/contexts.py (the loop's own: OpenAI-compatible or local) or a loaded model."""
    config = config or ExtractConfig()
    text = clean(text or "")
    if not text:
        return Extraction.none("the text is empty")
    llm = extractor_for(generator)
    if llm is None:
        return extract_by_rules(text)
    rules_first = config.rules_first if config.rules_first is not None else llm.method == "local"
    rules = extract_by_rules(text)
    if rules_first and rules.ok:
        return rules
    proposal = proposal_from_llm(text, llm)
    if proposal.ok:
        return proposal
    if rules.ok:  # the LLM declined or was overruled: the rules' reading stands, and why is kept
        return rules.with_reason(proposal.reason)
    return Extraction.none(f"{proposal.reason}; {rules.reason}", llm.name)
