"""Give stored facts their paraphrase contexts, from an LLM generator. Never blocks ingestion:
a failing generator is recorded in the fact's events and the template fallback is used."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from agent.progress import progress
from memory.models import Fact
from memory.store import FactStore


@dataclass
class EnrichReport:
    facts: int = 0
    contexts: int = 0
    failures: int = 0


def generator_from_args(kind: str, loaded=None):
    """Build the generator a user asked for; `auto` means OpenAI-compatible when configured, else local."""
    from agent.contexts import ContextConfig, make_generator

    config = ContextConfig.from_env()
    if kind != "auto":
        config.backend = kind
    elif not config.base_url:
        config.backend = "local"
    else:
        config.backend = "openai"
    return make_generator(config, loaded_model=loaded)


def enrich(store: FactStore, facts: Sequence[Fact], generator) -> EnrichReport:
    from agent.contexts import contexts_for

    report = EnrichReport()
    for fact in progress(facts, desc="contexts", unit=" facts"):
        if fact.prompt is None or fact.target is None:
            continue  # natural-language facts go to the gist pool or RAG as they are
        texts, name, error = contexts_for(fact.prompt, fact.target, generator)
        if error:
            report.failures += 1
            store.log_event(fact.id, "contexts_failed", generator=getattr(generator, "name", "?"), error=error)
        store.add_contexts(fact.id, texts, name)
        report.facts += 1
        report.contexts += len(texts)
    return report
