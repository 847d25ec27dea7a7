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
Where an answer ends, no token that would lengthen its last word may follow ("Lil' Mo" is not let run on into
"Lil' Mojo", nor "1961" into "1961963"), and no other answer may begin inside it. And a row is read until its
answer is written: the decoding steps after it no longer read the row (hooks.GistRuntime.find_copies), so the
text goes on as the model's own ("Quellmarsh Tavendor." where the gist, still read, went on "... Tavendor Quill").

A model may begin an answer with a shorter or longer first token than the answer's own (" N" for " Noct" ...,
" critical" for " critically"), or capitalised ("Chromosome" for "chromosome"). So a row also keeps those
first tokens, each followed by the tokens of the rest of the answer's text (" N" "oct" "uid" "ae").
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch

DEFAULT_MARGIN = 5.0  # nats above the position's best logit: the copied token's probability is >= 0.99
ANSWER_END = -1  # a copy target's token where an answer ends: no token may lengthen its last word
FIRST_TOKEN_CHARS = 24  # the longest first token (in characters) tried as another beginning of an answer


def token_forms(tokenizer, texts) -> list[list[int]]:
    """The distinct non-empty token-id sequences of `texts`, in order (no special tokens)."""
    out = []
    for text in texts:
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if ids and ids not in out:
            out.append(ids)
    return out


def answer_forms(tokenizer, answer: str | None) -> list[list[int]]:
    """The token-id sequences of `answer` as a continuation (" Noctuidae") and at a text's start, then the
    same capitalised, then each text begun with another first token (" N" "oct" "uid" "ae")."""
    answer = " ".join((answer or "").split())
    if not answer:
        return []
    texts = [" " + answer, answer]
    if answer[0].islower():
        texts += [" " + answer[0].upper() + answer[1:], answer[0].upper() + answer[1:]]
    forms = token_forms(tokenizer, texts)
    for form in _other_first_tokens(tokenizer, texts):
        if form not in forms:
            forms.append(form)
    return forms


def _other_first_tokens(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Each text begun with a one-token head other than its own first token, then its rest as tokenized."""
    out = []
    for text in texts:
        for k in range(1, min(len(text), FIRST_TOKEN_CHARS + 1)):
            head = text[:k]
            if not any(c.isalnum() for c in head):
                continue  # a bare space or quote begins too much to stand for this answer
            first = tokenizer(head, add_special_tokens=False)["input_ids"]
            rest = tokenizer(text[k:], add_special_tokens=False)["input_ids"]
            if len(first) == 1 and rest:
                out.append(list(first) + list(rest))
    return out


@lru_cache(maxsize=4)  # ~0.5 s for a 49k vocabulary; a process keeps one tokenizer
def word_continuing_tokens(tokenizer) -> torch.Tensor:
    """[V] bool: the tokens whose text begins with a letter or digit, so they would lengthen the word before."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return torch.tensor([bool(t) and t[0].isalnum() for t in texts], dtype=torch.bool)


def answer_ends(texts: Sequence[str], answers: Sequence[Sequence[str]], readable: Sequence[Sequence[int]],
                prompt_ends: Sequence[int] | None = None) -> list[dict[int, int | None]]:
    """Per sequence, per row it may read: where the row's first whole answer past the prompt ends (None: not
    written). An answer whole inside the prompt is not a written one (`prompt_ends` None: the prompt is empty)."""
    return [{row: _first_end(text, answers[row], prompt_ends[b] if prompt_ends is not None else 0) for row in rows}
            for b, (text, rows) in enumerate(zip(texts, readable))]


def copy_targets(texts: Sequence[str], starts: Sequence[int], answers: Sequence[Sequence[str]],
                 readable: Sequence[Sequence[int]], prompt_ends: Sequence[int] | None = None,
                 ends: list[dict[int, int | None]] | None = None) -> list[tuple[int, int, int]]:
    """(sequence, position in this forward, token id) for every position where a copy applies; the token is
    ANSWER_END where a row's answer ends.

    `texts`: per sequence, its token ids so far as an id string (hooks.id_string), this forward's last;
    `starts`: where this forward's tokens begin in it; `answers`: per pool row, its answer forms as id
    strings; `readable`: per sequence, the rows it may read; `prompt_ends`: per sequence, where its prompt
    ends (an answer whole inside the prompt is not a finished one; None: at the start); `ends`: answer_ends'
    result for these arguments, when the caller has it already."""
    out = []
    ends = answer_ends(texts, answers, readable, prompt_ends) if ends is None else ends
    for b, (text, start, rows, done) in enumerate(zip(texts, starts, readable, ends)):
        finished = sorted({end for end in done.values() if end is not None})
        claims: dict[int, tuple[int, int]] = {end: (0, ANSWER_END) for end in finished if end >= start}
        for row in rows:
            for form in answers[row]:
                for i in range(1, len(form)):
                    prefix, at = form[:i], text.find(form[:i], max(0, start - i + 1))
                    while at != -1 and (done[row] is None or at + i - 1 < done[row]):
                        end = at + i - 1  # the position whose next token is form[i]
                        inside_finished = any(at <= e <= end for e in finished)  # no answer begins inside one
                        if end >= start and i > claims.get(end, (0, 0))[0] and not inside_finished:
                            claims[end] = (i, ord(form[i]))
                        at = text.find(prefix, at + 1)
        out.extend((b, end - start, token) for end, (_, token) in sorted(claims.items()))
    return out


def _first_end(text: str, forms: Sequence[str], prompt_end: int) -> int | None:
    """Where the first whole answer (in any of its forms) that ends past the prompt ends; None: nowhere."""
    whole = [(text.find(form, max(0, prompt_end - len(form) + 1)), form) for form in forms]
    return min((at + len(form) - 1 for at, form in whole if at != -1), default=None)


def apply_copy(logits: torch.Tensor, targets: Sequence[tuple[int, int, int]], forward_length: int,
               margin: float = DEFAULT_MARGIN, word_continuing: torch.Tensor | None = None) -> torch.Tensor | None:
    """`logits` [B, T', V] with each target's token raised to `margin` over its position's maximum and, where
    an answer ends, the `word_continuing` tokens [V'] made impossible (None: no such rule); None when no
    target falls on a position these logits cover (T' < T when only the last ones are computed)."""
    offset = forward_length - logits.shape[1]
    hits = [(b, t - offset, tok) for b, t, tok in targets
            if t >= offset and (tok != ANSWER_END or word_continuing is not None)]
    if not hits:
        return None
    out = logits.clone()
    pushes = [h for h in hits if h[2] != ANSWER_END]
    if pushes:
        rows, cols, tokens = (torch.tensor(column, device=logits.device) for column in zip(*pushes))
        best = out[rows, cols].amax(dim=-1)  # [P]
        out[rows, cols, tokens] = torch.maximum(out[rows, cols, tokens], best + margin)
    stops = [h for h in hits if h[2] == ANSWER_END]
    if stops:
        rows, cols = (torch.tensor(column, device=logits.device) for column in list(zip(*stops))[:2])
        banned = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        width = min(len(word_continuing), len(banned))  # a padded vocabulary's extra ids continue nothing
        banned[:width] = word_continuing[:width].to(logits.device)
        out[rows, cols] = out[rows, cols].masked_fill(banned, torch.finfo(out.dtype).min)
    return out
