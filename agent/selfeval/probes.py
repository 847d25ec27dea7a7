"""The fixed locality probes of periodic self-evaluation, and the base model's answers to them.

The probes are the project's own cloze prompts (agent/selfeval/locality_probes.jsonl, one
{"prompt", "answer"} a line), never benchmark data. Locality compares the live model with the *base*
model on them, so the base answers are computed once per model fingerprint, with the weight edits taken
out and the gist pool not read, and kept as JSON in the store's data dir (`selfeval/base-<fp>.json`).
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from memory.atomic import atomic_write
from memory.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_PROBES = Path(__file__).with_name("locality_probes.jsonl")  # package data: found when installed too
CACHE_DIR = "selfeval"  # under the store's data dir


@dataclass(frozen=True)
class Probe:
    prompt: str
    answer: str  # teacher-forced locality scores the model's argmax on these tokens


def load_probes(path: str | Path | None = None) -> list[Probe]:
    """The probe set at `path` (default: the project's own); ConfigError naming the file and line."""
    path = Path(path) if path is not None else DEFAULT_PROBES
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read the locality probes {path}: {exc}") from exc
    probes = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            prompt, answer = record["prompt"], record["answer"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path}:{number}: a probe is a JSON object with prompt and answer ({exc})") from exc
        if not (isinstance(prompt, str) and prompt.strip() and isinstance(answer, str) and answer.strip()):
            raise ConfigError(f"{path}:{number}: prompt and answer must be non-empty strings")
        probes.append(Probe(prompt, answer))
    if not probes:
        raise ConfigError(f"{path} holds no locality probes")
    return probes


def probes_digest(probes: Sequence[Probe]) -> str:
    return hashlib.sha256(json.dumps([asdict(p) for p in probes]).encode()).hexdigest()[:16]


@dataclass
class BaseAnswers:
    """The base model on the probes: argmax tokens (teacher-forced), greedy answers, and the fluency of
    the fixed fluency prompts (a reference line for the curve)."""

    argmax: list[list[int]]
    greedy: list[str]
    fluency: float | None


def cache_path(data_dir: Path, fingerprint: str) -> Path:
    return Path(data_dir) / CACHE_DIR / f"base-{fingerprint}.json"


def open_base_answers(path: Path, key: dict, compute: Callable[[], BaseAnswers]) -> tuple[BaseAnswers, bool]:
    """The cached answers at `path` when their key matches (same model, probes and settings); else
    `compute()` them and write them atomically. Returns (answers, whether they were computed now)."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if record.get("key") == key:
            return BaseAnswers(record["argmax"], record["greedy"], record.get("fluency")), False
        log.info("base answers at %s are for other probes or settings: computing them again", path)
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError) as exc:  # a damaged cache is recomputed, not fatal
        log.warning("ignoring unreadable base answers %s: %s", path, exc)
    answers = compute()
    payload = json.dumps({"key": key, **asdict(answers)})
    atomic_write(path, lambda tmp: tmp.write_text(payload, encoding="utf-8"))
    return answers, True
