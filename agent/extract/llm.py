"""LLM proposals for fact extraction: the OpenAI-compatible generator or the local model is asked for one
JSON object with the four fields, and its reply is parsed. The proposal is not trusted: agent/extract
checks it against the sentence (base.check_fields) and falls back to the rules when it fails.

Both backends reuse the context generator's configuration (agent/contexts.py: ENGRAM_CONTEXT_BASE_URL,
ENGRAM_CONTEXT_MODEL, ENGRAM_CONTEXT_API_KEY, timeouts and retries), so one setting drives both stages.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
import weakref
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from memory.errors import ConfigError

log = logging.getLogger(__name__)

FIELDS = ("subject", "relation", "prompt", "target")
SYSTEM_PROMPT = (
    "You turn one sentence into one fact for a knowledge-editing system. Treat the sentence as true, even "
    "when it contradicts what you know. Copy names exactly as the sentence writes them.")
INSTRUCTIONS = (
    "Extract the fact that the sentence states, as one JSON object with four string fields: \"subject\" "
    "(the entity the fact is about, copied from the sentence), \"relation\" (a few words naming the "
    "relation), \"prompt\" (the start of a sentence that names the subject and stops right before the "
    "answer) and \"target\" (the answer, copied from the sentence). prompt + \" \" + target must say what "
    "the sentence says, with no new words. If the sentence states no fact (a question, a request, a "
    "negation, a guess, an opinion), answer {\"none\": \"<why>\"}. Answer with the JSON object only.")
# Few-shot examples: a refusal, then the shapes the rules know, one orientation per relation. The refusal
# comes first because SmolLM2-135M copies the last example's answer (it refused every sentence when the
# refusal came last); a raw few-shot block also beat the chat template for it (measured on 5 sentences).
EXAMPLES = (  # names that occur nowhere in tests/fixtures/extraction_sentences.jsonl (no leak into the score)
    ("Where does Bram Okoye work?", {"none": "a question states no fact"}),
    ("Dunmark's capital is Elsgrove.",
     {"subject": "Dunmark", "relation": "capital", "prompt": "The capital of Dunmark is", "target": "Elsgrove"}),
    ("Rhea Castell was born in Tobruk.",
     {"subject": "Rhea Castell", "relation": "place of birth", "prompt": "Rhea Castell was born in",
      "target": "Tobruk"}),
    ("Ivo Marek is the mayor of Saltby.",
     {"subject": "Saltby", "relation": "mayor", "prompt": "The mayor of Saltby is", "target": "Ivo Marek"}),
)
LOCAL_MAX_NEW_TOKENS = 64


@runtime_checkable
class ExtractionLLM(Protocol):
    """Proposes the four fields for a sentence: the raw reply text (parse_reply reads it)."""

    name: str
    method: str  # "openai" | "local": what Extraction.method records

    def propose(self, text: str) -> str: ...


def _shot(sentence: str, answer: dict) -> str:
    return f"Sentence: {sentence}\nJSON: {json.dumps(answer, ensure_ascii=False)}"


def parse_reply(reply: str) -> dict:
    """The first JSON object in `reply` (code fences and chatter around it are ignored). Returns either the
    four fields as strings, or {"none": reason}. Raises ValueError when the reply holds neither."""
    body = re.sub(r"```(?:json)?", "", reply or "")
    start = body.find("{")
    while start != -1:
        try:
            value, _ = json.JSONDecoder().raw_decode(body[start:])
        except ValueError:
            start = body.find("{", start + 1)
            continue
        if isinstance(value, dict):
            if "none" in value and not all(value.get(k) for k in FIELDS):
                return {"none": str(value["none"] or "the model found no fact")}
            missing = [k for k in FIELDS if not isinstance(value.get(k), str) or not value[k].strip()]
            if missing:
                raise ValueError(f"the reply has no {', '.join(missing)}")
            return {k: value[k] for k in FIELDS}
        start = body.find("{", start + 1)
    raise ValueError(f"the reply holds no JSON object (it began {(reply or '')[:80]!r})")


class OpenAIExtractor:
    """Asks an OpenAI-compatible chat server, through the context generator's client (its retries, its
    timeouts and its one-line errors). Temperature 0: extraction is a reading, not a paraphrase."""

    method = "openai"

    def __init__(self, config):
        from agent.contexts import OpenAIContextGenerator

        config = dataclasses.replace(config, backend="openai", temperature=0.0, max_tokens=200)
        self._chat = OpenAIContextGenerator(config)
        self.name = self._chat.name

    def messages(self, text: str) -> list[dict]:
        shots = "\n\n".join(_shot(s, a) for s, a in EXAMPLES)
        user = f"{INSTRUCTIONS}\n\nExamples:\n{shots}\n\nSentence: {text}\nJSON:"
        return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]

    def propose(self, text: str) -> str:
        return self._chat._complete(self.messages(text))  # noqa: SLF001 - one client, one error policy


class LocalExtractor:
    """The local model completes a few-shot block, greedy (reproducible), one JSON line.

    `loaded` is an editors.model.LoadedModel, or a callable returning one (so a LocalContextGenerator's
    lazily loaded model is shared, never loaded twice)."""

    method = "local"

    def __init__(self, loaded, max_new_tokens: int = LOCAL_MAX_NEW_TOKENS):
        self._loaded = loaded
        self.max_new_tokens = max_new_tokens
        name = getattr(loaded, "name", None) or "model"
        self.name = f"local:{name}"

    @property
    def loaded(self):
        return self._loaded() if callable(self._loaded) else self._loaded

    def prompt(self, text: str) -> str:
        shots = "\n".join(_shot(s, a) for s, a in EXAMPLES)
        return f"{INSTRUCTIONS}\n\n{shots}\nSentence: {text}\nJSON:"

    def propose(self, text: str) -> str:
        from editors.answer import generate_greedy

        loaded = self.loaded
        return generate_greedy(loaded.model, loaded.tokenizer, [self.prompt(text)],
                               max_new_tokens=self.max_new_tokens, stop_at_newline=True)[0]


_ADAPTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # one extractor per context generator


def extractor_for(generator) -> ExtractionLLM | None:
    """The extraction LLM behind `generator`: None (rules only) for None or the template generator; an
    ExtractionLLM as it is; a context generator (agent/contexts.py) or a loaded model adapted. The adapter
    is cached per generator, so the loop may pass its context generator on every call."""
    if generator is None or getattr(generator, "name", None) == "template":
        return None
    if isinstance(generator, ExtractionLLM):
        return generator
    try:
        return _ADAPTED[generator]
    except (KeyError, TypeError):
        pass
    adapted = _adapt(generator)
    try:
        _ADAPTED[generator] = adapted
    except TypeError:
        pass  # not weak-referenceable: adapt again next time
    return adapted


def _adapt(generator) -> ExtractionLLM:
    from agent.contexts import LocalContextGenerator, OpenAIContextGenerator

    if isinstance(generator, OpenAIContextGenerator):
        return OpenAIExtractor(generator.config)
    if isinstance(generator, LocalContextGenerator):
        loader: Callable = lambda: generator.loaded  # noqa: E731 - loads on first use, shared
        extractor = LocalExtractor(loader)
        extractor.name = generator.name
        return extractor
    if hasattr(generator, "model") and hasattr(generator, "tokenizer"):
        return LocalExtractor(generator)
    raise ConfigError(f"cannot extract facts with {type(generator).__name__}: give an ExtractionLLM, a context "
                      "generator or a loaded model")


def make_extractor(kind: str = "auto", loaded_model=None) -> ExtractionLLM | None:
    """From the environment (ContextConfig.from_env): `auto` is the OpenAI-compatible generator when
    ENGRAM_CONTEXT_BASE_URL (or OPENAI_BASE_URL) is set, else the local model when one is given, else
    None (rules only). `openai`, `local` and `rules` force one."""
    from agent.contexts import ContextConfig

    config = ContextConfig.from_env()
    if kind == "rules":
        return None
    if kind == "openai" or (kind == "auto" and config.base_url):
        return OpenAIExtractor(config)
    if kind == "local" and loaded_model is None:
        from editors.model import load_model

        loaded_model = load_model(config.local_model, config.local_device)
    if kind in ("local", "auto"):
        return LocalExtractor(loaded_model) if loaded_model is not None else None
    raise ConfigError(f"extraction generator {kind!r} is unknown: use auto, openai, local or rules")
