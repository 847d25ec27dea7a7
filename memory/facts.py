"""Validation of incoming fact records (DESIGN §3) into a typed `FactInput`.

A record needs either `prompt` + `target`, or `text`. Unknown keys, wrong types, empty strings,
oversized fields, control characters and unpaired surrogates are rejected with a reason that names the field.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from functools import cached_property

from memory.errors import ValidationError

SCOPES = ("global", "user", "session")
MAX_LEN = {"prompt": 1000, "target": 300, "subject": 300, "relation": 200, "text": 4000, "user_id": 200}
MAX_CONTEXTS, MAX_CONTEXT_LEN = 20, 1000
ALLOWED = set(MAX_LEN) | {"contexts", "scope"}
MULTILINE = {"text"}  # with contexts: may hold line breaks and tabs

# Controls (C0, DEL, C1) and lone surrogates. A surrogate only survives JSON decoding unpaired, e.g. "\ud800",
# and would break hashing and storage later; a NUL or ESC is never meant. Multi-line fields keep \t \n \r
# (a CSV cell from Excel carries \r\n).
_BAD_SINGLE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_BAD_MULTI = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


@dataclass(frozen=True)
class FactInput:
    prompt: str | None = None
    target: str | None = None
    subject: str | None = None
    relation: str | None = None
    text: str | None = None
    scope: str = "global"
    user_id: str | None = None
    contexts: tuple[str, ...] = field(default=())

    @cached_property
    def content_hash(self) -> str:
        """Identity of a fact: what it states and to whom. Contexts are not part of it."""
        key = [self.prompt, self.target, self.subject, self.relation, self.text, self.scope, self.user_id]
        return hashlib.sha256(json.dumps(key, ensure_ascii=False).encode()).hexdigest()

    @property
    def statement(self) -> str:
        """The fact as one sentence: its text, or prompt + target."""
        return self.text or f"{self.prompt} {self.target}"

    def supersede_keys(self) -> list[tuple]:
        """Keys under which a newer fact replaces an older one: same subject+relation, or same prompt."""
        keys = []
        owner = (self.scope, self.user_id)
        if self.subject and self.relation and self.target:
            keys.append(("sr", self.subject.casefold(), self.relation.casefold(), *owner))
        if self.prompt:
            keys.append(("p", self.prompt, *owner))
        return keys


def _check_characters(name: str, value: str, multiline: bool) -> None:
    bad = (_BAD_MULTI if multiline else _BAD_SINGLE).search(value)
    if bad:
        ch = bad.group()
        kind = "an unpaired surrogate" if "\ud800" <= ch <= "\udfff" else "a control character"
        raise ValidationError(f"{name} contains {kind} \\u{ord(ch):04x}")


def _string(record: dict, key: str) -> str | None:
    value = record.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValidationError(f"field '{key}' must be a string, got {type(value).__name__}")
    value = value.strip()
    if not value:
        raise ValidationError(f"field '{key}' is empty")
    if len(value) > MAX_LEN[key]:
        raise ValidationError(f"field '{key}' is too long ({len(value)} > {MAX_LEN[key]} characters)")
    if not value.isprintable():  # the fast path: printable text has no controls or surrogates
        _check_characters(f"field '{key}'", value, key in MULTILINE)
    return value


def _contexts(record: dict) -> tuple[str, ...]:
    value = record.get("contexts")
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ValidationError(f"field 'contexts' must be a list of strings, got {type(value).__name__}")
    if len(value) > MAX_CONTEXTS:
        raise ValidationError(f"field 'contexts' has {len(value)} items (at most {MAX_CONTEXTS})")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            raise ValidationError(f"contexts[{i}] must be a non-empty string")
        if len(item) > MAX_CONTEXT_LEN:
            raise ValidationError(f"contexts[{i}] is too long ({len(item)} > {MAX_CONTEXT_LEN} characters)")
        item = item.strip()  # checked like fields: after the edges' whitespace is gone
        if not item.isprintable():
            _check_characters(f"contexts[{i}]", item, multiline=True)
        out.append(item)
    return tuple(out)


def parse_fact(record: object) -> FactInput:
    """Validate one decoded record. Raises ValidationError with the reason."""
    if not isinstance(record, dict):
        raise ValidationError(f"a fact must be a JSON object, got {type(record).__name__}")
    unknown = sorted(set(record) - ALLOWED)
    if unknown:
        raise ValidationError(f"unknown field(s): {', '.join(unknown)}")
    fields = {key: _string(record, key) for key in MAX_LEN}
    scope = record.get("scope", "global")
    if scope is None:
        scope = "global"
    if scope not in SCOPES:
        raise ValidationError(f"field 'scope' must be one of {', '.join(SCOPES)}, got {scope!r}")
    if scope != "global" and not fields["user_id"]:
        raise ValidationError(f"scope '{scope}' needs a user_id")
    has_pair = fields["prompt"] is not None and fields["target"] is not None
    if not has_pair and fields["text"] is None:
        if fields["prompt"] or fields["target"]:
            missing = "target" if fields["prompt"] else "prompt"
            raise ValidationError(f"field '{missing}' is missing (a fact needs prompt + target, or text)")
        raise ValidationError("a fact needs prompt + target, or text")
    return FactInput(**fields, scope=scope, contexts=_contexts(record))
