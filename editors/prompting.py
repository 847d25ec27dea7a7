"""Prompts of the two baselines, ICL and RAG (DESIGN §1.3), shared by evaluation and the agent.

Both use one template, so the only difference between the baselines is which facts are shown:

    Facts:
    - The capital of Japan is Nairobi
    - ...

    <query>

The query part depends on its style:
- `completion`: the query verbatim ("The capital of Japan is"), so the model's continuation is the answer;
- `question`: "Question: ...\\nAnswer:", for plain-text questions to a base model;
- `chat`: "Question: ...", to be wrapped in the model's chat template (`wrap=`), which adds the answer turn;
- `auto` (default): `question` when the query ends with "?", else `completion`.

With no facts the prompt is the query part alone, so a baseline with nothing to show is the base model.

Order. ICL facts arrive oldest first (the store's order) and keep that order, so the newest fact sits
nearest the query. When they do not fit the context window the **oldest are cut** and the newest kept: in
a continual stream a newer fact is at least as current as an older one, and supersession already retired
the facts it replaced. RAG facts arrive best first and are shown **best last**, nearest the query, where a
small model attends most.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from memory.store import FactStore
    from memory.vector import VectorIndex

log = logging.getLogger(__name__)

STYLES = ("auto", "completion", "question", "chat")
HEADER = "Facts:\n"
BULLET = "- "


class IclPrompt(NamedTuple):
    prompt: str
    n_used: int  # facts in the prompt
    n_cut: int  # facts left out to fit the window (the oldest)


def fact_line(statement: str) -> str:
    """One fact as a bullet line; inner newlines are flattened so a fact cannot break the layout."""
    return BULLET + " ".join(statement.split()) + "\n"


def facts_block(statements: Sequence[str]) -> str:
    """'Facts:\\n- a\\n- b\\n\\n', or '' when there are none."""
    if not statements:
        return ""
    return HEADER + "".join(fact_line(s) for s in statements) + "\n"


def query_part(query: str, style: str = "auto") -> str:
    if style not in STYLES:
        raise ValueError(f"prompt style must be one of {', '.join(STYLES)}, got {style!r}")
    query = query.strip()
    if style == "auto":
        style = "question" if query.endswith("?") else "completion"
    if style == "question":
        return f"Question: {query}\nAnswer:"
    if style == "chat":
        return f"Question: {query}"
    return query


def build_prompt(statements: Sequence[str], query: str, style: str = "auto") -> str:
    """The shared template: the facts block, then the query part."""
    return facts_block(statements) + query_part(query, style)


def rag_prompt(retrieved_statements: Sequence[str], question: str, style: str = "auto",
               best_last: bool = True) -> str:
    """The RAG prompt from retrieved facts given best first (as `VectorIndex.search` ranks them)."""
    ordered = list(reversed(retrieved_statements)) if best_last else list(retrieved_statements)
    return build_prompt(ordered, question, style)


def _count(tokenizer, text: str) -> int:
    """Tokens the model will see for `text`, special tokens (BOS) included."""
    return len(tokenizer(text)["input_ids"])


def icl_prompt(facts_statements: Sequence[str], question: str, tokenizer, max_tokens: int, style: str = "auto",
               wrap: Callable[[str], str] | None = None) -> IclPrompt:
    """All facts (oldest first) before the question, cut from the oldest end to fit `max_tokens`.

    `max_tokens` bounds the whole prompt, so pass the context window minus the tokens to generate.
    `wrap` (e.g. a chat template) is applied before counting. Logs a warning naming how many were cut.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    wrap = wrap or (lambda text: text)
    statements = list(facts_statements)
    full = wrap(build_prompt(statements, question, style))
    if _count(tokenizer, full) <= max_tokens:
        return IclPrompt(full, len(statements), 0)
    # Too long: estimate the newest suffix that fits from per-line counts (one batched tokenizer call),
    # then verify on the real string, since tokens can merge across line boundaries.
    fixed = _count(tokenizer, wrap(HEADER + "\n" + query_part(question, style)))
    lines = tokenizer([fact_line(s) for s in statements], add_special_tokens=False)["input_ids"]
    budget, used = max_tokens - fixed, 0
    for ids in reversed(lines):
        if len(ids) > budget:
            break
        budget -= len(ids)
        used += 1
    newest = lambda n: wrap(build_prompt(statements[len(statements) - n:] if n else [], question, style))  # noqa: E731
    while used > 0 and _count(tokenizer, newest(used)) > max_tokens:
        used -= 1
    while used + 1 < len(statements) and _count(tokenizer, newest(used + 1)) <= max_tokens:
        used += 1  # merges made the estimate pessimistic: take every fact that still fits
    prompt, cut = newest(used), len(statements) - used
    if cut:
        log.warning("ICL prompt: %d of %d facts cut (the oldest) to fit %d tokens; %d kept",
                    cut, len(statements), max_tokens, used)
    if used == 0 and _count(tokenizer, prompt) > max_tokens:
        log.warning("ICL prompt: the question alone takes more than %d tokens", max_tokens)
    return IclPrompt(prompt, used, cut)


def retrieve_statements(index: VectorIndex, store: FactStore, query: str, k: int = 10,
                        user_id: str | None = None) -> list[str]:
    """The statements of the top-k facts for `query` visible to `user_id`, best first."""
    return [store.get_fact(fact_id).statement for fact_id, _score in index.search(query, k=k, user_id=user_id)]
