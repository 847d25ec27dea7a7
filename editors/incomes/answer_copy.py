"""The answer copy: once a query has begun the answer of a fact it may read, the answer's next token wins.

Why: a gist gets the first token of a rare multi-token answer right about as often as the model with the
fact in its prompt, and the later ones far less often (ZsRE's first 100 with the shipped add-on: 0.72 and
0.50, against 0.59 and 0.97 in context; docs/incomes.md, items 12-18). With the fact in its prompt the
model copies the token that follows the one it just wrote from the fact's own tokens (induction); one
token's keys and values cannot hold that, and neither more gists, a wider read nor weighting those tokens
closed the gap. So each pool row keeps its answer's token ids (a few ints per fact, next to ~23 KB of
gists), and when a sequence ends with the first i tokens of the answer of a row it may read, the logit of
the answer's token i is raised to `margin` above the position's largest logit.

Which rows count: only rows the gates let this sequence read (a subject it names and, with the relation
gate, a relation it asks), so a row without a subject never copies and the ungated pool never does. What
starts a copy is the model's own choice of the answer's first token: the gist decides that, the copy only
finishes a name the model has begun. In teacher-forced scoring the answer's prefix is given, so this
raises edit success by its later tokens alone; greedy generation (`*_gen` scores) shows what it does when
the model must begin the answer itself.

An answer is matched as token ids, in the forms the tokenizer writes it (after a space and at the start of a
text), longest prefix first; when two rows claim a position, the longer match wins, then the earlier row. An
answer is finished once: after a sequence holds a row's whole answer past its prompt, that row copies no more,
so a model that starts the name over ("Noctuidae Noctuidae ...", "2002" then "2" again) is not pushed through it
again. The prompt's own text does not count ("What is an ecological status of Bali myna?" holds " myna").
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

DEFAULT_MARGIN = 5.0  # nats above the position's best logit: the copied token's probability is >= 0.99


def token_forms(tokenizer, texts) -> list[list[int]]:
    """The distinct non-empty token-id sequences of `texts`, in order (no special tokens)."""
    out = []
    for text in texts:
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if ids and ids not in out:
            out.append(ids)
    return out


def answer_forms(tokenizer, answer: str | None) -> list[list[int]]:
    """The token-id sequences of `answer` as a continuation (" Noctuidae") and at a text's start."""
    answer = " ".join((answer or "").split())
    return token_forms(tokenizer, (" " + answer, answer)) if answer else []


def copy_targets(texts: Sequence[str], starts: Sequence[int], answers: Sequence[Sequence[str]],
                 readable: Sequence[Sequence[int]], prompt_ends: Sequence[int] | None = None) -> list[tuple[int, int, int]]:
    """(sequence, position in this forward, token id) for every position where a copy applies.

    `texts`: per sequence, its token ids so far as an id string (hooks.id_string), this forward's last;
    `starts`: where this forward's tokens begin in it; `answers`: per pool row, its answer forms as id
    strings; `readable`: per sequence, the rows it may read; `prompt_ends`: per sequence, where its prompt
    ends (an answer whole inside the prompt is not a finished one; None: at the start)."""
    out = []
    for b, (text, start, rows) in enumerate(zip(texts, starts, readable)):
        claims: dict[int, tuple[int, int]] = {}  # position in text -> (prefix length, token id)
        prompt_end = prompt_ends[b] if prompt_ends is not None else 0
        for row in rows:
            whole = [text.find(form, max(0, prompt_end - len(form) + 1)) for form in answers[row]]
            done = min((at + len(form) - 1 for at, form in zip(whole, answers[row]) if at != -1), default=len(text))
            for form in answers[row]:
                for i in range(1, len(form)):
                    prefix, at = form[:i], text.find(form[:i], max(0, start - i + 1))
                    while at != -1 and at + i - 1 < done:
                        end = at + i - 1  # the position whose next token is form[i]
                        if end >= start and i > claims.get(end, (0, 0))[0]:
                            claims[end] = (i, ord(form[i]))
                        at = text.find(prefix, at + 1)
        out.extend((b, end - start, token) for end, (_, token) in sorted(claims.items()))
    return out


def apply_copy(logits: torch.Tensor, targets: Sequence[tuple[int, int, int]], forward_length: int,
               margin: float = DEFAULT_MARGIN) -> torch.Tensor | None:
    """`logits` [B, T', V] with each target's token raised to `margin` over its position's maximum; None
    when no target falls on a position these logits cover (T' < T when only the last ones are computed)."""
    offset = forward_length - logits.shape[1]
    hits = [(b, t - offset, tok) for b, t, tok in targets if t >= offset]
    if not hits:
        return None
    out = logits.clone()
    rows = torch.tensor([h[0] for h in hits], device=logits.device)
    cols = torch.tensor([h[1] for h in hits], device=logits.device)
    tokens = torch.tensor([h[2] for h in hits], device=logits.device)
    best = out[rows, cols].amax(dim=-1)  # [P]
    out[rows, cols, tokens] = torch.maximum(out[rows, cols, tokens], best + margin)
    return out
