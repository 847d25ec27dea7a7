"""Facts from plain sentences (issue 22, item 3): a text fact's subject, relation, cloze prompt and target.

    extraction = extract_fact("Zorbia's capital is Quellmarsh.", generator)   # agent.extract.extract
    record_extraction(session, fact.id, extraction)                          # agent.extract.record
    apply_extraction(session, fact, extraction)   # fills the fact, so the mention gate and ICE can use it

A sentence that yields nothing stays a text fact (for the gist pool and RAG); its reason is recorded.
"""
from agent.extract.base import Extraction, check_fields, claim_gate
from agent.extract.extract import ExtractConfig, extract_fact, proposal_from_llm
from agent.extract.llm import ExtractionLLM, LocalExtractor, OpenAIExtractor, extractor_for, make_extractor, parse_reply
from agent.extract.record import Applied, apply_extraction, latest_extraction, record_extraction, settle_keys
from agent.extract.rules import extract_by_rules

__all__ = [
    "Applied", "ExtractConfig", "Extraction", "ExtractionLLM", "LocalExtractor", "OpenAIExtractor",
    "apply_extraction", "check_fields", "claim_gate", "extract_by_rules", "extract_fact", "extractor_for",
    "latest_extraction", "make_extractor", "parse_reply", "proposal_from_llm", "record_extraction", "settle_keys",
]
