"""The preservation term of the weight editors: KL to the pre-edit model on prompts the edit must not change.

Two kinds, both written from the fact itself (never taken from evaluation data):
- the fact's own relation asked of other subjects ("The mother tongue of Albert Einstein is" for an edit of
  "The mother tongue of Danielle Darrieux is"), which the edit's relation should not carry over to;
- other relations asked of the fact's subject ("Danielle Darrieux was born in"), which it should not
  rewrite either.
The pre-edit model's next-token distribution at the end of each prompt is the teacher; the term is the
mean KL(teacher || current) over the prompts.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

OTHER_SUBJECTS = ("Albert Einstein", "France", "Toyota", "the Amazon River", "Tokyo", "William Shakespeare",
                  "Microsoft", "Brazil", "Marie Curie", "the Eiffel Tower", "Canada", "Pablo Picasso")
OTHER_RELATIONS = ("{s} is a", "{s} was born in", "The native language of {s} is", "{s} is located in",
                   "{s} works for", "{s} is a citizen of", "{s} was founded by", "The capital of {s} is")


def _pick(options: Sequence[str], n: int, seed: str) -> list[str]:
    """`n` of `options`, chosen by a hash of `seed`: the same fact always gets the same prompts."""
    start = int(hashlib.sha256(seed.encode()).hexdigest(), 16) % len(options)
    return [options[(start + i) % len(options)] for i in range(min(n, len(options)))]


def preservation_prompts(prompt: str, subject: str | None, n_each: int = 2) -> list[str]:
    """Prompts about other subjects with the fact's relation, and about its subject with other relations."""
    subject = (subject or "").strip()
    if not subject or subject not in prompt:
        return []  # without the subject in the prompt neither kind can be written
    others = [o for o in OTHER_SUBJECTS if o.lower() != subject.lower()]
    same_relation = [prompt.replace(subject, other) for other in _pick(others, n_each, prompt)]
    asked = " ".join(prompt.lower().split())
    # a template whose words around {s} all appear in the prompt asks the fact's own relation
    relations = [r for r in OTHER_RELATIONS
                 if not all(part.strip().lower() in asked for part in r.split("{s}") if part.strip())]
    other_relations = [r.replace("{s}", subject) for r in _pick(relations, n_each, subject)]
    if other_relations and other_relations[0][0].islower():
        other_relations = [p[0].upper() + p[1:] for p in other_relations]
    return same_relation + other_relations


@dataclass
class PreservationJob:
    """The prompts' ids (right-padded), where each ends, and the pre-edit model's log-probs there."""

    ids: torch.Tensor  # [P, L]
    last: torch.Tensor  # [P]
    teacher_logp: torch.Tensor  # [P, V]


def _batch(tokenizer, prompts: Sequence[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    ids = torch.zeros((len(encoded), max(map(len, encoded))), dtype=torch.long)
    for i, row in enumerate(encoded):  # right padding: causal attention keeps the real positions exact
        ids[i, :len(row)] = torch.tensor(row)
    return ids.to(device), torch.tensor([len(r) - 1 for r in encoded], device=device)


def _last_logp(model, ids: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids, use_cache=False).logits  # [P, L, V]
    return torch.log_softmax(logits[torch.arange(len(ids)), last].float(), dim=-1)  # [P, V]


def prepare(model, tokenizer, prompts: Sequence[str], device) -> PreservationJob | None:
    if not prompts:
        return None
    ids, last = _batch(tokenizer, prompts, device)
    with torch.no_grad():
        teacher = _last_logp(model, ids, last)
    return PreservationJob(ids, last, teacher)


def kl_term(model, job: PreservationJob) -> torch.Tensor:
    """Mean over the prompts of KL(pre-edit || now) at their next token (a scalar with its graph)."""
    student = _last_logp(model, job.ids, job.last)
    teacher_p = job.teacher_logp.exp()
    return (teacher_p * (job.teacher_logp - student)).sum(-1).mean()
