"""Where teacher-forced targets begin, for code that decides on a sequence's tokens before the layers run.

Teacher forcing feeds a prompt and its target in one forward. A causal model's prediction of a target token
depends only on the tokens before it, but a decision taken on the whole input sequence (the gist pool's
mention and relation gates, which pick the pool rows a sequence may read) would let the target's own tokens
change the predictions of the tokens before them. The scorer marks, per batch row, where the prompt ends;
such a decision then looks at the prompt only, as it does when generating (where only the prompt exists).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

_PROMPT_LENGTHS: ContextVar[tuple[int, ...] | None] = ContextVar("prompt_lengths", default=None)


@contextmanager
def prompts_end_at(lengths: Sequence[int]) -> Iterator[None]:
    """Inside: row b of the next forwards' input ids is prompt for its first `lengths[b]` tokens."""
    token = _PROMPT_LENGTHS.set(tuple(int(n) for n in lengths))
    try:
        yield
    finally:
        _PROMPT_LENGTHS.reset(token)


def prompt_parts(id_lists: list[list[int]]) -> list[list[int]]:
    """Each row's prompt part (the rows as they are outside `prompts_end_at`, or if its batch differs)."""
    lengths = _PROMPT_LENGTHS.get()
    if lengths is None or len(lengths) != len(id_lists):
        return id_lists
    return [row[:n] for row, n in zip(id_lists, lengths)]
