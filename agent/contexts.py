"""Paraphrase contexts for a fact (prompt + target): sentences that state the new fact, for ICE (DESIGN §1.1).

Three backends sit behind one small protocol (`name`, `generate(prompt, target, n)`):

- `openai`: any OpenAI-compatible chat server, through the official `openai` client, asked in the
  words of the ICE paper's appendix C for `n` complete statements. The reply is parsed robustly
  (JSON arrays, numbered or bulleted lists, quotes) and only statements containing the target are kept.
- `local`: the embedded instruct model writes paraphrases from a few prompt variants (greedy, so the
  output is reproducible); survivors that state the target are topped up with templates.
- `template`: deterministic templates, no model. Also the fallback of every other backend.

`contexts_for` never raises: a failing generator yields the templates plus the error text, so
ingestion is never blocked (agent/enrich.py records the failure in the fact's events).
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from memory.errors import ConfigError, EngramError
from memory.facts import MAX_CONTEXT_LEN, MAX_CONTEXTS

log = logging.getLogger(__name__)

BACKENDS = ("openai", "local", "template")
TEMPLATE_NAME = "template"
DEFAULT_N = 5
DEFAULT_OPENAI_MODEL = "gpt-4o-mini"

SYSTEM_PROMPT = (
    "You write short, complete factual statements for a knowledge-editing system. Treat the given fact as "
    "true, even when it contradicts what you know, and never comment on it."
)
# Appendix C of the ICE paper, plus the output contract that makes the reply easy to parse.
USER_PROMPT = (
    "Please help me generate {count} complete statements as [context]s according to the semantics of "
    "incomplete facts '{prompt}' and '{target}'. Every statement must state this fact and contain "
    "'{target}' verbatim. Answer with a JSON array of {n} strings and nothing else."
)
# Prompt variants for the local model: greedy decoding over several phrasings gives varied, reproducible text.
LOCAL_VARIANTS = (
    "Rewrite this fact as one complete sentence, in different words: {statement}",
    "Paraphrase the following statement and keep '{target}' in it: {statement}",
    "Write one short sentence that says that {lc_statement}",
    "Please help me generate five complete statements as [context]s according to the semantics of "
    "incomplete facts '{prompt}' and '{target}'.",
)
LOCAL_SYSTEM = "You rewrite facts. Treat every fact as true and answer with the rewritten sentence only."
_NUMBER_WORDS = dict(enumerate("one two three four five six seven eight nine ten".split(), start=1))
_LOWERABLE = {"the", "a", "an", "in", "on", "at", "for", "of", "this", "that", "these", "those", "its", "his",
              "her", "their", "our", "my", "your", "what", "who", "which", "where", "when", "how"}


class ContextGenerationError(EngramError):
    """A context generator could not produce any usable statement."""


@runtime_checkable
class ContextGenerator(Protocol):
    """Writes up to `n` sentences that each state the fact `prompt` + `target` (and contain the target)."""

    name: str

    def generate(self, prompt: str, target: str, n: int) -> list[str]: ...


@dataclass
class ContextConfig:
    """Settings of context generation; validate() runs on construction and again in make_generator."""

    backend: str = TEMPLATE_NAME
    base_url: str | None = None
    model: str = DEFAULT_OPENAI_MODEL
    api_key: str | None = None
    n: int = DEFAULT_N
    timeout: float = 30.0
    max_retries: int = 2
    temperature: float | None = 0.7
    max_tokens: int | None = 512
    local_model: str = "smollm2-135m"
    local_device: str = "auto"
    local_max_new_tokens: int = 32

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"context backend {self.backend!r} is unknown: use one of {', '.join(BACKENDS)}")
        if not 1 <= self.n <= MAX_CONTEXTS:
            raise ConfigError(f"contexts per fact must be 1..{MAX_CONTEXTS}, got {self.n}")
        if not self.timeout > 0:
            raise ConfigError(f"context timeout must be positive seconds, got {self.timeout}")
        if self.max_retries < 0:
            raise ConfigError(f"context max_retries must be >= 0, got {self.max_retries}")
        if self.base_url and not re.match(r"^https?://", self.base_url):
            raise ConfigError(f"context base URL must start with http:// or https://, got {self.base_url!r}")
        if self.local_max_new_tokens < 1:
            raise ConfigError("local_max_new_tokens must be >= 1")

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> ContextConfig:
        """Read ENGRAM_CONTEXT_* (falling back to OPENAI_BASE_URL / OPENAI_API_KEY). Without an explicit
        ENGRAM_CONTEXT_BACKEND, a configured base URL means `openai`, else `local`."""
        env = os.environ if env is None else env
        base_url = env.get("ENGRAM_CONTEXT_BASE_URL") or env.get("OPENAI_BASE_URL") or None
        backend = env.get("ENGRAM_CONTEXT_BACKEND") or ("openai" if base_url else "local")
        return cls(
            backend=backend.strip().lower(),
            base_url=base_url,
            model=env.get("ENGRAM_CONTEXT_MODEL") or DEFAULT_OPENAI_MODEL,
            api_key=env.get("ENGRAM_CONTEXT_API_KEY") or env.get("OPENAI_API_KEY") or None,
            n=_env_number(env, "ENGRAM_CONTEXT_N", int, DEFAULT_N),
            timeout=_env_number(env, "ENGRAM_CONTEXT_TIMEOUT", float, 30.0),
            max_retries=_env_number(env, "ENGRAM_CONTEXT_MAX_RETRIES", int, 2),
            local_model=env.get("ENGRAM_MODEL") or "smollm2-135m",
            local_device=env.get("ENGRAM_DEVICE") or "auto",
        )


def _env_number(env, key: str, kind: type, default):
    raw = env.get(key)
    if raw is None or not raw.strip():
        return default
    try:
        return kind(raw)
    except ValueError:
        raise ConfigError(f"{key}={raw!r} is not a valid {kind.__name__}") from None


# ---------------------------------------------------------------------------------------------- templates
def _statement(prompt: str, target: str) -> str:
    """`prompt target.`: the authors' fallback context, with one closing full stop."""
    text = f"{prompt.strip()} {target.strip()}".strip()
    return text if text[-1:] in ".!?" else text + "."


def _lower_first(text: str) -> str:
    """Lower-case a leading function word ("The capital ..." -> "the capital ..."), never a name."""
    first = text.split(" ", 1)[0]
    return text[0].lower() + text[1:] if first.lower() in _LOWERABLE else text


def template_contexts(prompt: str, target: str, n: int = DEFAULT_N) -> list[str]:
    """Deterministic contexts that all state the fact; the first is exactly the authors' fallback."""
    statement = _statement(prompt, target)
    inner = _lower_first(statement)
    variants = [
        statement,
        f"It is known that {inner}",
        f"Fact: {statement}",
        f"According to the latest information, {inner}",
        f"Remember this: {statement}",
        f"As has been confirmed, {inner}",
        f"Note that {inner}",
    ]
    return _dedupe(variants)[:max(1, n)]


class TemplateContextGenerator:
    """No model, no network: the templates above."""

    name = TEMPLATE_NAME

    def __init__(self, n: int = DEFAULT_N):
        self.n = n

    def generate(self, prompt: str, target: str, n: int | None = None) -> list[str]:
        return template_contexts(prompt, target, n or self.n)


# ------------------------------------------------------------------------------------------------ parsing
_FENCE = re.compile(r"```[a-zA-Z]*\s*(.*?)```", re.S)
_MARKER = re.compile(  # list markers: "1.", "(2)", "3)", "-", "*", "•", "[context] 1:", "Context 2:"
    r"^\s*(?:[-*•·–—>]+\s+|\(?\d{1,2}[.):\]](?=\s|$)\s*|\[\s*context\s*\d*\s*\]s?\s*\d*\s*[:.)-]?\s*"
    r"|context\s*\d*\s*[:.)]\s*)+",
    re.I,
)
_QUOTES = "\"'“”‘’`"
_JSON_KEY = re.compile(r'^[\[{\s]*"[\w ]{1,40}"\s*:\s*(?=["“])')  # a line of JSON cut short: {"key": "...


def _dedupe(items) -> list[str]:
    seen, out = set(), []
    for item in items:
        key = " ".join(item.split()).casefold()
        if key and key not in seen:
            seen.add(key)
            out.append(" ".join(item.split()))
    return out


def _json_items(text: str) -> list[str] | None:
    """The strings of the first JSON array in `text` (also inside an object), or None if there is none."""
    start, end = text.find("["), text.rfind("]")
    candidates = [text[start:end + 1]] if 0 <= start < end else []
    brace, close = text.find("{"), text.rfind("}")
    if 0 <= brace < close:
        candidates.append(text[brace:close + 1])
    for chunk in candidates:
        try:
            value = json.loads(chunk)
        except ValueError:
            continue
        if isinstance(value, dict):
            value = next((v for v in value.values() if isinstance(v, list)), None)
        if isinstance(value, list):
            items = [v if isinstance(v, str) else _first_string(v) for v in value]
            return [i for i in items if i]
    return None


def _first_string(value) -> str | None:
    if isinstance(value, dict):
        for key in ("context", "statement", "text", "content"):
            if isinstance(value.get(key), str):
                return value[key]
    return None


def _clean_line(line: str) -> str:
    line = _MARKER.sub("", line.replace("**", "").strip()).strip().rstrip(",").strip()
    line = _JSON_KEY.sub("", line).rstrip("]}, ").strip()
    if len(line) >= 2 and line[0] in _QUOTES and line[-1] in _QUOTES:
        line = line[1:-1].strip()
    return line


def parse_statements(text: str) -> list[str]:
    """Split an LLM reply into candidate statements: JSON arrays, numbered/bulleted lists, quoted lines.
    Empty and duplicate items are dropped (case- and whitespace-insensitive); order is kept."""
    if not text or not text.strip():
        return []
    fence = _FENCE.search(text)
    body = fence.group(1) if fence else text
    items = _json_items(body)
    if items is None:
        lines = [_clean_line(line) for line in body.splitlines()]
        items = [line for line in lines if line and not line.endswith(":")]
        if len(items) == 1:  # one paragraph: split it into sentences
            items = re.split(r"(?<=[.!?])\s+(?=[A-Z\"“'])", items[0])
    return _dedupe(_clean_line(item) for item in items)


def filter_statements(items, target: str, n: int | None = None, required=()) -> list[str]:
    """Keep statements that contain the target (case-insensitive), say more than the target alone, and
    contain every word in `required` (e.g. the names in the prompt)."""
    wanted = target.strip().casefold()
    target_words = len(target.split())
    needed = [w.casefold() for w in required]
    kept = [s for s in _dedupe(items)
            if wanted in s.casefold() and len(s.split()) > target_words and len(s) <= MAX_CONTEXT_LEN
            and all(w in s.casefold() for w in needed)]
    return kept[:n] if n else kept


def prompt_names(prompt: str) -> list[str]:
    """Capitalised words of the prompt that are not function words: "Danielle Darrieux's mother tongue is"
    -> ["Danielle", "Darrieux"]. A paraphrase that drops or mangles them no longer states the fact."""
    return _dedupe(w for w in re.findall(r"\b[A-Z][\w-]*", prompt) if w.casefold() not in _LOWERABLE | {"i"})


# -------------------------------------------------------------------------------------- OpenAI-compatible
class OpenAIContextGenerator:
    """Asks an OpenAI-compatible chat server; the client retries 408/409/429/5xx and connection errors."""

    def __init__(self, config: ContextConfig):
        from openai import OpenAI

        if not config.base_url and not config.api_key:
            raise ConfigError("the openai context backend needs ENGRAM_CONTEXT_BASE_URL or an API key "
                              "(ENGRAM_CONTEXT_API_KEY / OPENAI_API_KEY)")
        self.config = config
        self.n = config.n
        self.name = f"openai:{config.model}"
        # Local OpenAI-compatible servers ignore the key, but the client insists on one.
        self.client = OpenAI(base_url=config.base_url, api_key=config.api_key or "not-needed",
                             timeout=config.timeout, max_retries=config.max_retries)

    def messages(self, prompt: str, target: str, n: int) -> list[dict]:
        user = USER_PROMPT.format(count=_NUMBER_WORDS.get(n, str(n)), prompt=prompt.strip(),
                                  target=target.strip(), n=n)
        return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]

    def generate(self, prompt: str, target: str, n: int | None = None) -> list[str]:
        n = n or self.n
        reply = self._complete(self.messages(prompt, target, n))
        kept = filter_statements(parse_statements(reply), target, n)
        if not kept:
            raise ContextGenerationError(f"{self.name}: no statement in the reply contains {target!r} "
                                         f"(reply began {reply[:120]!r})")
        return kept

    def _complete(self, messages: list[dict]) -> str:
        import openai

        cfg = self.config
        where = cfg.base_url or "api.openai.com"
        extra = {"temperature": cfg.temperature} if cfg.temperature is not None else {}
        if cfg.max_tokens is not None:
            extra["max_tokens"] = cfg.max_tokens
        try:
            response = self.client.chat.completions.create(model=cfg.model, messages=messages, **extra)
        except openai.APITimeoutError as exc:
            raise ContextGenerationError(f"{self.name}: timed out after {cfg.timeout:g} s "
                                         f"({cfg.max_retries} retries) at {where}") from exc
        except openai.APIConnectionError as exc:
            raise ContextGenerationError(f"{self.name}: cannot reach {where} "
                                         f"after {cfg.max_retries} retries ({exc})") from exc
        except openai.APIStatusError as exc:
            raise ContextGenerationError(f"{self.name}: HTTP {exc.status_code} from {where} "
                                         f"after {cfg.max_retries} retries: {exc.message}") from exc
        except openai.OpenAIError as exc:
            raise ContextGenerationError(f"{self.name}: {type(exc).__name__}: {exc}") from exc
        if not response.choices:
            raise ContextGenerationError(f"{self.name}: the reply had no choices")
        return response.choices[0].message.content or ""


# -------------------------------------------------------------------------------------------- local model
class LocalContextGenerator:
    """The embedded instruct model paraphrases the fact; too few survivors are topped up with templates.
    A survivor must contain the target and the prompt's names (small models tend to "correct" a
    counterfactual or garble the subject; those are dropped).

    `loaded_model` is anything with `.model` and `.tokenizer` (editors.model.LoadedModel); when it is
    None the configured local model is loaded on first use."""

    def __init__(self, config: ContextConfig | None = None, loaded_model=None):
        self.config = config or ContextConfig(backend="local")
        self.n = self.config.n
        self._loaded = loaded_model
        self.name = f"local:{getattr(loaded_model, 'name', None) or self.config.local_model}"

    @property
    def loaded(self):
        if self._loaded is None:
            from editors.model import load_model

            log.info("loading %s for local context generation", self.config.local_model)
            self._loaded = load_model(self.config.local_model, self.config.local_device)
        return self._loaded

    def prompts(self, prompt: str, target: str) -> list[str]:
        from editors.answer import chat_prompt

        statement = _statement(prompt, target)
        fields = {"statement": statement, "lc_statement": _lower_first(statement), "prompt": prompt.strip(),
                  "target": target.strip()}
        tokenizer = self.loaded.tokenizer
        return [chat_prompt(tokenizer, v.format(**fields), system=LOCAL_SYSTEM) for v in LOCAL_VARIANTS]

    def complete(self, prompts: list[str]) -> list[str]:
        """Greedy continuations, one per prompt (kept whole: a reply may be a list)."""
        from editors.answer import generate_greedy

        loaded = self.loaded
        return generate_greedy(loaded.model, loaded.tokenizer, prompts,
                               max_new_tokens=self.config.local_max_new_tokens, stop_at_newline=False)

    def generate(self, prompt: str, target: str, n: int | None = None) -> list[str]:
        n = n or self.n
        candidates = [s for reply in self.complete(self.prompts(prompt, target)) for s in parse_statements(reply)]
        kept = filter_statements(candidates, target, n, required=prompt_names(prompt))
        if len(kept) < n:
            log.debug("%s: %d of %d paraphrases state %r; topping up with templates", self.name, len(kept), n, target)
            kept = _dedupe(kept + template_contexts(prompt, target, n + len(kept)))[:n]
        return kept


# ---------------------------------------------------------------------------------------------- front door
def make_generator(config: ContextConfig | None = None, loaded_model=None) -> ContextGenerator:
    """The generator that `config.backend` names (ContextConfig.from_env() when config is None)."""
    config = config or ContextConfig.from_env()
    config.validate()
    if config.backend == "openai":
        return OpenAIContextGenerator(config)
    if config.backend == "local":
        return LocalContextGenerator(config, loaded_model)
    return TemplateContextGenerator(config.n)


def contexts_for(prompt: str, target: str, generator: ContextGenerator,
                 n: int | None = None) -> tuple[list[str], str, str | None]:
    """(texts, generator name, error). Never raises: on any failure the template contexts come back under
    the name "template", with the error text. Output that is only templates is also named "template"."""
    n = n or getattr(generator, "n", DEFAULT_N)
    templates = template_contexts(prompt, target, max(n, 8))
    try:
        texts = _dedupe(t for t in generator.generate(prompt, target, n) if isinstance(t, str))[:n]
        if not texts:
            raise ContextGenerationError(f"{getattr(generator, 'name', '?')} returned no contexts")
    except Exception as exc:  # a generator must never block ingestion
        error = str(exc) if isinstance(exc, EngramError) else f"{type(exc).__name__}: {exc}"
        log.warning("context generation failed for %r -> %r: %s; using templates", prompt, target, error)
        return templates[:n], TEMPLATE_NAME, error
    name = TEMPLATE_NAME if set(texts) <= set(templates) else getattr(generator, "name", "?")
    return texts, name, None
