"""Facts from plain sentences (agent/extract): the rules, the validation of LLM proposals, the
OpenAI-compatible path through the stub server, and the record/apply round trip on a temp store."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import select

from agent.contexts import ContextConfig, LocalContextGenerator, OpenAIContextGenerator, TemplateContextGenerator
from agent.extract import (
    ExtractConfig, Extraction, LocalExtractor, OpenAIExtractor, apply_extraction, claim_gate, extract_by_rules,
    extract_fact, extractor_for, latest_extraction, parse_reply, record_extraction,
)
from agent.extract.measure import load_cases, score
from agent.extract.rules import split_sentences
from memory.facts import parse_fact
from memory.models import Event, Fact, FactExtraction
from tests.openai_stub import OpenAIStub, openai_stub  # noqa: F401  (openai_stub is a fixture)

FIXTURE = Path(__file__).parent / "fixtures" / "extraction_sentences.jsonl"
# Measured with `python scripts/measure_extraction.py` (rules): 39 of 43 facts right on every field, 7 of
# 7 no-fact sentences answered "nothing", no fact invented. A regression below this fails.
RULES_ALL_THREE, RULES_NOTHING = 39, 7


# ------------------------------------------------------------------------------------------------ rules
@pytest.mark.parametrize("text, fields", [
    ("Zorbia's capital is Quellmarsh.", ("Zorbia", "capital", "The capital of Zorbia is", "Quellmarsh")),
    ("Acme Robotics' chief executive is Dana Whitfield.",
     ("Acme Robotics", "chief executive", "The chief executive of Acme Robotics is", "Dana Whitfield")),
    ("The capital of Ostravia is Brellin.", ("Ostravia", "capital", "The capital of Ostravia is", "Brellin")),
    ("The CEO of Northwind Traders is Priya Raman.",
     ("Northwind Traders", "CEO", "The CEO of Northwind Traders is", "Priya Raman")),
    ("Quellmarsh is the capital of Zorbia.", ("Zorbia", "capital", "The capital of Zorbia is", "Quellmarsh")),
    ("Hedda Moss was the first president of Calvaria.",
     ("Calvaria", "first president", "The first president of Calvaria was", "Hedda Moss")),
    ("Ana Vex was born in Quellmarsh.", ("Ana Vex", "place of birth", "Ana Vex was born in", "Quellmarsh")),
    ("Jonah Pike was born in 1987.", ("Jonah Pike", "date of birth", "Jonah Pike was born in", "1987")),
    ("Mateo Alvarez was born in Rosario in 1991.",
     ("Mateo Alvarez", "place of birth", "Mateo Alvarez was born in", "Rosario")),
    ("The Eiffel Tower is located in Rome.", ("Eiffel Tower", "location", "The Eiffel Tower is located in", "Rome")),
    ("Tomas Lind speaks Finnish.", ("Tomas Lind", "language", "Tomas Lind speaks", "Finnish")),
    ("Priya Raman works for Globex.", ("Priya Raman", "employer", "Priya Raman works for", "Globex")),
    ("Dr. Helen Cho works at St. Mary's Hospital.",
     ("Dr. Helen Cho", "employer", "Dr. Helen Cho works at", "St. Mary's Hospital")),
    ("Lena Fischer worked for Siemens until 2019.", ("Lena Fischer", "employer", "Lena Fischer worked for", "Siemens")),
    ("Luis Ferreira plays for the Harbor City Owls.",
     ("Luis Ferreira", "team", "Luis Ferreira plays for", "the Harbor City Owls")),
    ("Sofia Marin plays the cello.", ("Sofia Marin", "instrument", "Sofia Marin plays the", "cello")),
    ("Kenji Watanabe plays tennis.", ("Kenji Watanabe", "plays", "Kenji Watanabe plays", "tennis")),
    ("Zorblax is a rare mineral.", ("Zorblax", "instance of", "Zorblax is a", "rare mineral")),
    ("The Silver Harp was written by Tomas Lind.",
     ("Silver Harp", "author", "The Silver Harp was written by", "Tomas Lind")),
    ("Ingrid Solberg is married to Piet Solberg.",
     ("Ingrid Solberg", "spouse", "Ingrid Solberg is married to", "Piet Solberg")),
    ("Ana Vex's brother lives in Oslo.", ("Ana Vex", "brother's residence", "Ana Vex's brother lives in", "Oslo")),
    ("Lumen Labs was founded in 1975 by Oskar Brandt.", ("Lumen Labs", "founded", "Lumen Labs was founded in", "1975")),
    ("Quellmarsh’s capital is Ostrava, a city by the sea.",  # curly apostrophe; the appositive is cut
     ("Quellmarsh", "capital", "The capital of Quellmarsh is", "Ostrava")),
])
def test_rule_patterns(text, fields):
    got = extract_by_rules(text)
    assert (got.subject, got.relation, got.prompt, got.target) == fields
    assert (got.method, got.status, got.reason) == ("rules", "ok", None)


@pytest.mark.parametrize("text, why", [
    ("What is the capital of Zorbia?", "question"),
    ("Zorbia's capital is not Quellmarsh.", "negated"),
    ("Ana Vex hasn't worked for Globex.", "negated"),
    ("I think Ana Vex was born in Quellmarsh.", "hedged"),
    ("If it rains, Ana Vex works at home.", "conditional"),
    ("It was a long and rainy afternoon.", "no common sentence pattern"),
    ("Please remember to water the plants.", "no common sentence pattern"),
    ("The University of Zorbia is large.", "no common sentence pattern"),
    ("", "empty"),
])
def test_rules_refuse_what_they_cannot_read(text, why):
    got = extract_fact(text)
    assert not got.ok and got.status == "none" and got.prompt is None
    assert why in got.reason


def test_sentence_split_keeps_abbreviations_and_initials():
    assert split_sentences("Dr. Helen Cho works at St. Mary's. J. R. Ward is a poet. Done!") == [
        "Dr. Helen Cho works at St. Mary's.", "J. R. Ward is a poet.", "Done!"]
    got = extract_by_rules("What a day! Ana Vex speaks Tamskan.")  # the first readable sentence
    assert (got.subject, got.target) == ("Ana Vex", "Tamskan")


def test_claim_gate():
    assert claim_gate("May Ellis works for Globex.") is None  # "May" opening a sentence is a name
    assert "hedged" in claim_gate("Ana Vex may work for Globex.")


# ------------------------------------------------------------------------------------ LLM proposals
class StubLLM:
    """An ExtractionLLM that replies with a fixed dict (or raises), counting its calls."""

    def __init__(self, reply, method: str = "openai"):
        self.reply, self.method, self.name, self.calls = reply, method, f"{method}:stub", 0

    def propose(self, text: str) -> str:
        self.calls += 1
        if isinstance(self.reply, Exception):
            raise self.reply
        return self.reply if isinstance(self.reply, str) else json.dumps(self.reply)


MOVED = "In 2020, Ana Vex moved to Brellin."  # no rule reads it
GOOD_MOVED = {"subject": "Ana Vex", "relation": "residence", "prompt": "In 2020, Ana Vex moved to",
              "target": "Brellin."}


def test_valid_llm_proposal_is_taken():
    got = extract_fact(MOVED, StubLLM(GOOD_MOVED))
    assert (got.subject, got.relation, got.prompt, got.target) == ("Ana Vex", "residence", "In 2020, Ana Vex moved to",
                                                                   "Brellin")  # final punctuation dropped
    assert (got.method, got.generator) == ("openai", "openai:stub")


@pytest.mark.parametrize("change, why", [
    ({"subject": "Anna Vexx"}, "subject 'Anna Vexx' is not in the text"),  # invented subject
    ({"target": "Quellmarsh"}, "target 'Quellmarsh' is not in the text"),  # invented target
    ({"prompt": "In 2020, Ana Vex moved to Brellin"}, "contains the target"),
    ({"prompt": "In 2020, the singer Ana Vex moved to"}, "adds singer"),  # words the sentence never said
    ({"prompt": "In 2020, she moved to"}, "does not contain the subject"),
    ({"target": "Ana Vex"}, "the subject and the target overlap"),
])
def test_llm_output_not_grounded_in_the_text_is_rejected(change, why):
    got = extract_fact(MOVED, StubLLM(GOOD_MOVED | change))
    assert not got.ok and why in got.reason and "proposal rejected" in got.reason
    assert "rules: no common sentence pattern" in got.reason  # the fallback was tried too


def test_llm_subject_cut_from_a_longer_name_is_rejected():
    cut = {"subject": "Northwind", "relation": "headquarters", "prompt": "The headquarters of Northwind is",
           "target": "Oslo"}
    got = extract_fact("Northwind Traders is headquartered in Oslo.", StubLLM(cut))
    assert (got.subject, got.method) == ("Northwind Traders", "rules")
    assert "the subject 'Northwind' is cut from a longer name" in got.reason


def test_rejected_llm_output_falls_back_to_rules():
    invented = {"subject": "Zorbia", "relation": "capital", "prompt": "The capital of Zorbia is", "target": "Paris"}
    got = extract_fact("Zorbia's capital is Quellmarsh.", StubLLM(invented))
    assert (got.subject, got.target, got.method) == ("Zorbia", "Quellmarsh", "rules")
    assert "target 'Paris' is not in the text" in got.reason


def test_llm_cannot_read_a_fact_into_a_hedge():
    hedge = {"subject": "Ana Vex", "relation": "employer", "prompt": "Ana Vex works for", "target": "Globex"}
    got = extract_fact("Maybe Ana Vex works for Globex.", StubLLM(hedge))
    assert not got.ok and "hedged" in got.reason


@pytest.mark.parametrize("reply", [RuntimeError("boom"), "I cannot help with that.", {"subject": "Ana Vex"}])
def test_failing_llm_never_raises(reply):
    got = extract_fact("Ana Vex speaks Tamskan.", StubLLM(reply))
    assert (got.target, got.method) == ("Tamskan", "rules") and got.reason.startswith("openai:stub")


def test_llm_none_answer_is_recorded_as_the_reason():
    got = extract_fact("Lovely weather in Brellin.", StubLLM({"none": "an opinion"}))
    assert not got.ok and "openai:stub found no fact: an opinion" in got.reason


def test_order_rules_first_for_the_local_model():
    local = StubLLM({"none": "?"}, method="local")
    assert extract_fact("Tomas Lind speaks Finnish.", local).method == "rules" and local.calls == 0
    assert extract_fact(MOVED, StubLLM(GOOD_MOVED, method="local")).method == "local"  # rules missed it
    remote = StubLLM({"subject": "Tomas Lind", "relation": "tongue", "prompt": "Tomas Lind speaks",
                      "target": "Finnish"})
    assert extract_fact("Tomas Lind speaks Finnish.", remote).relation == "tongue" and remote.calls == 1
    forced = StubLLM({"none": "?"}, method="openai")
    assert extract_fact("Tomas Lind speaks Finnish.", forced, ExtractConfig(rules_first=True)).method == "rules"
    assert forced.calls == 0


def test_parse_reply():
    fields = {"subject": "A B", "relation": "r", "prompt": "A B is", "target": "C"}
    assert parse_reply(f"Sure!\n```json\n{json.dumps(fields)}\n```") == fields
    assert parse_reply('{"none": "a question"}') == {"none": "a question"}
    with pytest.raises(ValueError, match="no prompt, target"):
        parse_reply('{"subject": "A", "relation": "r"}')
    with pytest.raises(ValueError, match="no JSON object"):
        parse_reply("no json here {")


def test_extractor_for_adapts_the_context_generators():
    assert extractor_for(None) is None and extractor_for(TemplateContextGenerator()) is None
    stub = StubLLM({})
    assert extractor_for(stub) is stub
    fake_model = type("Loaded", (), {"model": object(), "tokenizer": object(), "name": "fake"})()
    local_gen = LocalContextGenerator(ContextConfig(backend="local"), loaded_model=fake_model)
    adapted = extractor_for(local_gen)
    assert isinstance(adapted, LocalExtractor) and adapted.loaded is fake_model and adapted.method == "local"
    assert extractor_for(local_gen) is adapted  # cached: the loop may pass its generator every time


def test_local_extractor_with_a_tiny_model_falls_back_to_rules():
    from editors.model import tiny_llama, tiny_tokenizer

    model, tokenizer = tiny_llama(layers=1, hidden=32), tiny_tokenizer()
    loaded = type("Loaded", (), {"model": model, "tokenizer": tokenizer, "name": "tiny"})()
    extractor = LocalExtractor(loaded, max_new_tokens=2)
    got = extract_fact("Tomas Lind speaks Finnish.", extractor, ExtractConfig(rules_first=False))
    assert (got.target, got.method) == ("Finnish", "rules") and got.reason.startswith("local:tiny")


# ------------------------------------------------------------------------------- OpenAI-compatible path
def openai_generator(stub: OpenAIStub, **overrides) -> OpenAIContextGenerator:
    settings = {"backend": "openai", "base_url": stub.base_url, "model": "stub-model", "api_key": "sk-test",
                "max_retries": 0, "timeout": 5.0} | overrides
    return OpenAIContextGenerator(ContextConfig(**settings))


def test_openai_path_through_the_stub(openai_stub):
    openai_stub.reply = "Here you go:\n```json\n" + json.dumps(GOOD_MOVED) + "\n```"
    got = extract_fact(MOVED, openai_generator(openai_stub))  # the loop's context generator, adapted
    assert (got.subject, got.prompt, got.target) == ("Ana Vex", "In 2020, Ana Vex moved to", "Brellin")
    assert (got.method, got.generator) == ("openai", "openai:stub-model")
    (request,) = openai_stub.chat_requests
    body = request["body"]
    assert body["model"] == "stub-model" and body["temperature"] == 0.0
    assert MOVED in body["messages"][-1]["content"] and "JSON" in body["messages"][-1]["content"]


def test_openai_invented_target_is_rejected(openai_stub):
    openai_stub.reply = json.dumps(GOOD_MOVED | {"target": "Vienna"})
    got = extract_fact(MOVED, OpenAIExtractor(openai_generator(openai_stub).config))
    assert not got.ok and "target 'Vienna' is not in the text" in got.reason


def test_openai_server_errors_fall_back_to_rules(openai_stub):
    openai_stub.fail_first = 5
    got = extract_fact("Tomas Lind speaks Finnish.", openai_generator(openai_stub))
    assert (got.target, got.method) == ("Finnish", "rules") and "HTTP 500" in got.reason


# ------------------------------------------------------------------------------------ record / apply
def _ingest(store, record: dict) -> Fact:
    report = store.add_facts([parse_fact(record)])
    return store.get_fact(report.fact_ids[0])


def test_record_and_apply_round_trip(store):
    fact = _ingest(store, {"text": "Zorbia's capital is Quellmarsh."})
    hash_before = fact.content_hash
    extraction = extract_fact(fact.text)
    with store.transaction() as s:
        row_id = record_extraction(s, fact.id, extraction)
        assert record_extraction(s, fact.id, extraction) == row_id  # a replayed step records once
        applied = apply_extraction(s, fact, extraction)
    assert applied.filled and applied.superseded == [] and applied.superseded_by is None
    # the caller's copy reads as the row does
    assert (fact.subject, fact.prompt, fact.target) == ("Zorbia", "The capital of Zorbia is", "Quellmarsh")
    stored = store.get_fact(fact.id)
    assert (stored.subject, stored.relation, stored.prompt, stored.target) == (
        "Zorbia", "capital", "The capital of Zorbia is", "Quellmarsh")
    assert stored.text == "Zorbia's capital is Quellmarsh." and stored.content_hash == hash_before
    with store.transaction() as s:
        row = latest_extraction(s, fact.id)
        assert (row.id, row.status, row.method, row.target) == (row_id, "ok", "rules", "Quellmarsh")
        assert s.scalar(select(FactExtraction.id).where(FactExtraction.fact_id == fact.id).limit(1)) == row_id
    kinds = [e.kind for e in store.history(fact.id)]
    assert kinds == ["ingested", "extracted", "extraction_applied"]
    again = store.add_facts([parse_fact({"text": "Zorbia's capital is Quellmarsh."})])  # dedupe still holds
    assert (again.stored, again.duplicates, again.fact_ids) == (0, 1, [fact.id])
    with store.transaction() as s:  # applying twice changes nothing
        assert apply_extraction(s, store.get_fact(fact.id), extraction).filled
    assert [e.kind for e in store.history(fact.id)].count("extraction_applied") == 1


def test_no_fact_sentence_stays_a_text_fact_with_its_reason(store):
    fact = _ingest(store, {"text": "What is the capital of Zorbia?"})
    extraction = extract_fact(fact.text)
    with store.transaction() as s:
        record_extraction(s, fact.id, extraction)
        applied = apply_extraction(s, fact, extraction)
    assert not applied.filled and "question" in applied.reason
    stored = store.get_fact(fact.id)
    assert (stored.prompt, stored.target, stored.subject) == (None, None, None)
    assert stored.text == "What is the capital of Zorbia?"
    with store.transaction() as s:
        row = latest_extraction(s, fact.id)
        assert (row.status, row.method, row.prompt) == ("none", None, None) and "question" in row.reason
        event = s.scalars(select(Event).where(Event.fact_id == fact.id, Event.kind == "extraction_none")).one()
        assert "question" in event.detail["reason"]


def test_supplied_fields_are_never_overwritten(store):
    fact = _ingest(store, {"text": "Zorbia's capital is Quellmarsh.", "prompt": "Zorbia's capital:",
                           "target": "Quellmarsh"})
    with store.transaction() as s:
        applied = apply_extraction(s, fact, extract_fact(fact.text))
    assert not applied.filled and store.get_fact(fact.id).prompt == "Zorbia's capital:"


def _extract_and_apply(store, fact: Fact):
    extraction = extract_fact(fact.text)
    with store.transaction() as s:
        record_extraction(s, fact.id, extraction)
        return apply_extraction(s, fact, extraction)


def test_newer_text_fact_supersedes_the_older_once_extracted(store):
    old = _ingest(store, {"text": "Zorbia's capital is Quellmarsh."})
    new = _ingest(store, {"text": "The capital of Zorbia is Brightwater."})
    assert store.get_fact(old.id).status == "active"  # text facts have no keys at ingest
    assert _extract_and_apply(store, new).superseded == []  # no rival has the keys yet
    applied = _extract_and_apply(store, old)  # extracted late: the older assertion loses
    assert applied.filled and applied.superseded_by == new.id
    assert (store.get_fact(old.id).status, store.get_fact(old.id).superseded_by) == ("superseded", new.id)
    assert store.get_fact(new.id).status == "active"
    assert store.history(old.id)[-1].detail == {"by": new.id, "via": "extraction"}


def test_extracted_fact_supersedes_an_older_structured_fact_and_a_newer_one_supersedes_it(store):
    first = _ingest(store, {"prompt": "The capital of Zorbia is", "target": "Oldtown", "subject": "Zorbia",
                            "relation": "capital"})
    text = _ingest(store, {"text": "Zorbia's capital is Quellmarsh."})
    assert _extract_and_apply(store, text).superseded == [first.id]
    assert store.get_fact(first.id).status == "superseded"
    later = store.add_facts([parse_fact({"prompt": "The capital of Zorbia is", "target": "Brightwater",
                                         "subject": "Zorbia", "relation": "capital"})])
    assert later.superseded == 1 and store.get_fact(text.id).superseded_by == later.fact_ids[0]


def test_reasserted_text_fact_wins_its_keys_back(store):
    text = _ingest(store, {"text": "Zorbia's capital is Quellmarsh."})
    _extract_and_apply(store, text)
    newer = store.add_facts([parse_fact({"prompt": "The capital of Zorbia is", "target": "Brightwater",
                                         "subject": "Zorbia", "relation": "capital"})]).fact_ids[0]
    assert store.get_fact(text.id).status == "superseded"
    again = store.add_facts([parse_fact({"text": "Zorbia's capital is Quellmarsh."})])
    assert again.reactivated == 1 and store.get_fact(newer).status == "active"  # the text line has no keys
    applied = _extract_and_apply(store, store.get_fact(text.id))  # the loop extracts it again
    assert applied.filled and applied.superseded == [newer]
    assert store.get_fact(newer).status == "superseded" and store.get_fact(text.id).status == "active"


def test_other_scopes_are_not_rivals(store):
    mine = _ingest(store, {"text": "Zorbia's capital is Quellmarsh.", "scope": "user", "user_id": "u1"})
    other = _ingest(store, {"text": "Zorbia's capital is Brightwater.", "scope": "user", "user_id": "u2"})
    _extract_and_apply(store, mine)
    assert _extract_and_apply(store, other).superseded == []
    assert store.get_fact(mine.id).status == store.get_fact(other.id).status == "active"


# ----------------------------------------------------------------------------------------- the fixture
def test_fixture_has_fifty_sentences_and_the_rules_score_holds():
    cases = load_cases(FIXTURE)
    assert len(cases) == 50 and len({c.text for c in cases}) == 50
    assert sum(not c.has_fact for c in cases) == RULES_NOTHING
    result = score(cases, extract_fact)
    assert result.correct["all"] >= RULES_ALL_THREE, [(c.text, w) for c, _, w in result.misses]
    assert result.nothing_correct == RULES_NOTHING and result.invented == 0
    for case in cases:  # the expected fields obey the rules an extraction must obey
        if case.has_fact:
            from agent.extract import check_fields

            assert check_fields(case.text, *(case.expected[k] for k in ("subject", "relation", "prompt", "target"))) \
                is None, case.text


def test_extraction_none_helper():
    got = Extraction.none("why")
    assert (got.ok, got.status, got.reason) == (False, "none", "why")


def test_the_agent_loop_extracts_a_text_fact_before_routing_it(store):
    from memory.facts import FactInput
    from memory.stages import STORED, claim, open_stages, owner_id

    from agent.loop.stages import contexts_step

    fact_id = store.add_facts([FactInput(text="Zorbia's capital is Quellmarsh.")]).new_ids[0]
    with store.transaction() as s:
        open_stages(s, [fact_id])
    owner = owner_id()
    claimed, _ = claim(store, owner, 60.0, 10, 5)
    assert [c.fact_id for c in claimed] == [fact_id] and claimed[0].stage == STORED
    contexts_step(store, owner, store.get_fact(fact_id), None)
    fact = store.get_fact(fact_id)
    assert (fact.subject, fact.prompt, fact.target) == ("Zorbia", "The capital of Zorbia is", "Quellmarsh")
    assert "extracted" in [e.kind for e in store.history(fact_id)]
