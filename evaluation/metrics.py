"""Knowledge-editing metrics, exactly as DESIGN §1.4 defines them. Two protocols, never mixed:

- Teacher-forced (EasyEdit/KnowEdit): `teacher_forced_accuracy` gives edit_success, rephrase and portability;
  `argmax_tokens` + `locality` give locality against the pre-edit model's cached argmax.
- Generation: greedy outputs (editors.answer.generate_greedy) scored by `exact_match_at_start`, and
  `multihop_accuracy` for MQuAKE. `fluency` and `pplr` score generated text.

Tokenisation of a target: the target is scored as the continuation of its prompt. We tokenise the joined
text `prompt + " " + target` (the EasyEdit join) and the prompt alone; the target's tokens are those after
their common prefix. Tokenising the target on its own would get the leading space wrong: BPE vocabularies
have a distinct token for " Paris" (with the space) and SentencePiece adds its own prefix marker, so only the
joined text gives the tokens the model would actually produce after the prompt.

Shift convention everywhere: the logits at position t predict token t+1, so token t is scored by row t-1.
"""
from __future__ import annotations

import logging
import math
import re
import string
from collections import Counter
from collections.abc import Sequence

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

FLUENCY_WEIGHTS = {2: 2 / 3, 3: 4 / 3}  # DESIGN §1.4: (2/3)·H2 + (4/3)·H3


# ---------------------------------------------------------------------------------------------- pure maths

def span_argmax(logits: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """The argmax predictions for tokens start..end-1 of a sequence, from its logits [T, V].

    Token t is predicted by logits row t-1, so we read rows start-1 .. end-2. start must be >= 1.
    """
    if not 1 <= start <= end <= logits.shape[0]:
        raise ValueError(f"bad span [{start}, {end}) for a sequence of {logits.shape[0]} positions")
    return logits[start - 1:end - 1].argmax(dim=-1)  # [end - start]


def token_accuracy(predicted: Sequence[int] | torch.Tensor, target: Sequence[int] | torch.Tensor) -> float:
    """The fraction of positions where the predicted token equals the target token."""
    pred, tgt = torch.as_tensor(predicted), torch.as_tensor(target)
    if pred.shape != tgt.shape or pred.numel() == 0:
        raise ValueError(f"need two equal, non-empty token lists, got {tuple(pred.shape)} and {tuple(tgt.shape)}")
    return (pred == tgt).float().mean().item()


def locality(pre_argmax: Sequence[int], post_argmax: Sequence[int]) -> float:
    """The fraction of a locality probe's answer tokens whose post-edit argmax equals the pre-edit argmax.

    The pre-edit argmax comes from the original model (cache it once); both lists come from `argmax_tokens`.
    They have equal lengths unless a method changed the prompt so that the answer re-tokenised at the
    boundary; then the unmatched extra positions count as changed.
    """
    n = max(len(pre_argmax), len(post_argmax))
    if n == 0:
        raise ValueError("a locality probe needs at least one answer token")
    return sum(int(a) == int(b) for a, b in zip(pre_argmax, post_argmax)) / n


def span_nll(logits: torch.Tensor, ids: Sequence[int] | torch.Tensor, start: int, end: int) -> float:
    """The mean negative log-likelihood (nats) of tokens start..end-1, each scored by the row before it."""
    if not 1 <= start < end <= logits.shape[0]:
        raise ValueError(f"bad span [{start}, {end}) for a sequence of {logits.shape[0]} positions")
    log_probs = F.log_softmax(logits[start - 1:end - 1].float(), dim=-1)  # [n, V]
    tokens = torch.as_tensor(ids, device=logits.device)[start:end]  # [n]
    return -log_probs.gather(1, tokens[:, None]).mean().item()


def mean_or_none(values: Sequence[float]) -> float | None:
    """The mean, or None when there is nothing to average (a metric a dataset lacks is null)."""
    return sum(values) / len(values) if len(values) else None


# ---------------------------------------------------------------------------------------------- tokenising

def join_prompt_target(prompt: str, target: str) -> str:
    """prompt + " " + target, without doubling a space either side already has (chat prompts end in \\n)."""
    if not prompt or prompt[-1].isspace() or target[:1].isspace():
        return prompt + target
    return prompt + " " + target


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text)["input_ids"])


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def encode_continuation(tokenizer, prefix: str, full: str) -> tuple[list[int], int]:
    """The token ids of `full` and the index where the tokens of its part after `prefix` begin."""
    ids, head = _ids(tokenizer, full), _ids(tokenizer, prefix)
    start = _common_prefix(head, ids)
    if start < len(head):  # a token merged across the boundary: it counts as part of the continuation
        log.debug("prefix %r re-tokenised at the boundary of %r", prefix[-20:], full[-40:])
    # the first token has no logits before it; a tokenizer without BOS leaves it unscored
    start = max(start, 1)
    if start >= len(ids):
        raise ValueError(f"the text after {prefix!r} produced no tokens")
    return ids, start


def encode_target(tokenizer, prompt: str, target: str) -> tuple[list[int], int]:
    """Token ids of prompt+" "+target and the index of the target's first token."""
    if not target.strip():
        raise ValueError(f"empty target for prompt {prompt!r}")
    return encode_continuation(tokenizer, prompt, join_prompt_target(prompt, target))


# ---------------------------------------------------------------------------------------------- model helpers

def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _pad_id(tokenizer) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0  # any id works: padded positions are masked and never read


@torch.no_grad()
def _span_predictions(model, tokenizer, prompts: Sequence[str], targets: Sequence[str],
                      batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per case (target token ids, argmax predictions at those positions) under teacher forcing.

    Batches are RIGHT padded with an attention mask: a causal model never looks right, so the real tokens'
    logits (and their default 0..n-1 positions) are the same as unpadded. Longest first, to pad little.
    Leading tokens that every prompt shares (ICL's facts block) run once (editors.prefix_cache).
    """
    from editors.causal import prompts_end_at
    from editors.prefix_cache import shared_prefix_for

    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    encoded = [encode_target(tokenizer, p, t) for p, t in zip(prompts, targets)]
    # every scored row (start - 1) must lie in the part that runs, so share at most min(start) - 1 tokens
    prefix = shared_prefix_for(model, [ids for ids, _ in encoded], min((s for _, s in encoded), default=1) - 1)
    skip = prefix.length if prefix else 0
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    device, pad = _device(model), _pad_id(tokenizer)
    results: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(encoded)
    for first in range(0, len(order), batch_size):
        chunk = order[first:first + batch_size]
        width = len(encoded[chunk[0]][0]) - skip
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)  # [B, L - skip]
        mask = torch.zeros((len(chunk), width), dtype=torch.long)  # [B, L - skip]
        for row, i in enumerate(chunk):
            ids = encoded[i][0][skip:]
            input_ids[row, :len(ids)] = torch.tensor(ids)
            mask[row, :len(ids)] = 1
        with prompts_end_at([encoded[i][1] - skip for i in chunk]):  # gates look at the prompt only
            if prefix:
                logits = prefix.forward(input_ids.to(device), mask.to(device)).logits  # [B, L - skip, V]
            else:
                logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits  # [B, L, V]
        for row, i in enumerate(chunk):
            ids, start = encoded[i]
            pred = span_argmax(logits[row], start - skip, len(ids) - skip).cpu()
            results[i] = (torch.tensor(ids[start:]), pred)
    return results  # type: ignore[return-value]


def teacher_forced_accuracy(model, tokenizer, prompts: Sequence[str], targets: Sequence[str],
                            batch_size: int = 8) -> list[float]:
    """Per case: the fraction of target tokens that are the argmax given prompt + target[:i] (DESIGN §1.4)."""
    return [token_accuracy(pred, tgt) for tgt, pred in _span_predictions(model, tokenizer, prompts, targets,
                                                                         batch_size)]


def argmax_tokens(model, tokenizer, prompts: Sequence[str], answers: Sequence[str],
                  batch_size: int = 8) -> list[list[int]]:
    """Per probe: the model's argmax at each answer-token position, teacher-forced on the probe's answer.

    Call it once on the original model (and cache the result) and again after edits; `locality` compares them.
    """
    return [pred.tolist() for _, pred in _span_predictions(model, tokenizer, prompts, answers, batch_size)]


@torch.no_grad()
def pplr(model, tokenizer, prompt: str, target: str, continuation: str) -> float:
    """PPL_r (ICE paper, D.1): the perplexity of the generated `continuation` after prompt + target, divided
    by the perplexity of prompt + target itself. Pass the *base* model.

    `continuation` is the raw generated text that follows the target (usually starting with a space). One
    forward pass scores both spans; every token is scored by the logits of the position before it, so the
    prompt's first token is unscored when the tokenizer adds no BOS.
    """
    head = join_prompt_target(prompt, target)
    ids, cont_start = encode_continuation(tokenizer, head, head + continuation)
    if cont_start < 2:
        raise ValueError(f"prompt + target {head!r} is too short to have a perplexity")
    input_ids = torch.tensor([ids], device=_device(model))  # [1, T]
    logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits[0]  # [T, V]
    nll_continuation = span_nll(logits, ids, cont_start, len(ids))
    nll_head = span_nll(logits, ids, 1, cont_start)
    return math.exp(nll_continuation - nll_head)  # ratio of perplexities = exp(difference of mean NLLs)


# ---------------------------------------------------------------------------------------------- generation

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD-style: lowercase, drop punctuation and the articles a/an/the, collapse whitespace."""
    text = text.lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match_at_start(output: str, answers: str | Sequence[str]) -> bool:
    """True when the normalised output starts with a normalised answer (or alias) at a word boundary.

    "Paris, the capital" matches "Paris"; "Parisian" does not. An answer that normalises to nothing never
    matches, so a stray "The" cannot count as correct.
    """
    out = normalize_answer(output)
    for answer in [answers] if isinstance(answers, str) else answers:
        ans = normalize_answer(answer)
        if ans and (out == ans or out.startswith(ans + " ")):
            return True
    return False


def multihop_accuracy(outputs: Sequence[str | Sequence[str]], answer_alias_lists: Sequence[Sequence[str]]) -> float:
    """The fraction of multi-hop cases answered (answer or alias at the start of the output).

    An item of `outputs` may be a list, one output per paraphrased question of the case; the case counts
    as correct when any of them is (MQuAKE's convention over its three questions).
    """
    if len(outputs) != len(answer_alias_lists):
        raise ValueError(f"{len(outputs)} outputs but {len(answer_alias_lists)} answer lists")
    if not outputs:
        raise ValueError("no multi-hop cases to score")
    hits = 0
    for out, answers in zip(outputs, answer_alias_lists):
        candidates = [out] if isinstance(out, str) else list(out)
        hits += any(exact_match_at_start(c, answers) for c in candidates)
    return hits / len(outputs)


# ---------------------------------------------------------------------------------------------- fluency

def _words(text: str) -> list[str]:
    # an approximation of nltk.word_tokenize (ROME's tokeniser): words and single punctuation marks
    return re.findall(r"\w+|[^\w\s]", text)


def ngram_entropy(text: str, n: int) -> float:
    """The entropy, in bits, of the frequency distribution of word n-grams in `text` (0 when it has none)."""
    words = _words(text)
    counts = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    total = sum(counts.values())
    return -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0


def fluency(text: str) -> float:
    """(2/3)·H2 + (4/3)·H3 in bits, on ~100 generated tokens (DESIGN §1.4). Repetitive text scores low.

    ROME's code (copied by EasyEdit and ICE) weights the same way, but then takes the arithmetic *mean* of
    the two weighted terms, so its reported numbers are half of this (and the ICE tables show them ×100).
    Compare with those tables as fluency / 2.
    """
    return sum(w * ngram_entropy(text, n) for n, w in FLUENCY_WEIGHTS.items())
