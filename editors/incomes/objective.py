"""The InComeS training objective and the held-out check (DESIGN §1.2).

Per query token: loss = w * CE_student + KL(teacher || student), with
w = max(0, CE_teacher_without_fact - CE_teacher_with_fact) on answer tokens (0 elsewhere).
The teacher is the frozen base model (the same model with no pool: bit-identical) fed
`[fact text, "\n", query]`; the student reads the query alone with a pool of gists. Locality queries
use the no-fact teacher, so the student learns to "attend to nothing" (w = 0 there).
P below is the number of scored query positions in a batch, V the vocabulary.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from editors.incomes.compress import compress_texts
from editors.incomes.traindata import Query, TrainFact


@dataclass
class Encoded:
    student_ids: torch.Tensor  # [B, Ts] right-padded query (with the tokenizer's prefix, e.g. BOS)
    student_mask: torch.Tensor  # [B, Ts]
    s_rows: torch.Tensor  # [P] batch row of each scored position
    s_cols: torch.Tensor  # [P] position whose logits predict the target
    targets: torch.Tensor  # [P] the query token predicted there
    answer: torch.Tensor  # [P] bool: the target is an answer token
    with_fact: torch.Tensor  # [P] bool: the teacher sees the fact (False for locality queries)
    query_of: torch.Tensor  # [P] which query of the batch
    teacher_ids: torch.Tensor | None = None  # [B, Tt] right-padded [fact, "\n", query]
    teacher_mask: torch.Tensor | None = None
    t_cols: torch.Tensor | None = None  # [P]


def _pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # [B, T]
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # [B, T]
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
    return ids.to(device), mask.to(device)


def encode(tokenizer, queries: Sequence[Query], fact_texts: Sequence[str] | None, device) -> Encoded:
    """Token ids for student (and teacher, when fact_texts is given), with aligned scored positions."""
    prefix = tokenizer("")["input_ids"]  # [] or [BOS]: whatever the tokenizer puts first
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    students, teachers, cols = [], [], {k: [] for k in ("rows", "s", "t", "tgt", "ans", "fact", "q")}
    for b, q in enumerate(queries):
        prompt = tokenizer(q.prompt, add_special_tokens=False)["input_ids"]
        query = prompt + tokenizer(" " + q.answer, add_special_tokens=False)["input_ids"]
        students.append(prefix + query)
        fact = (tokenizer(fact_texts[b])["input_ids"] + newline) if fact_texts is not None else []
        teachers.append(fact + query)
        for j in range(0 if prefix else 1, len(query)):
            cols["rows"].append(b), cols["s"].append(len(prefix) + j - 1), cols["t"].append(len(fact) + j - 1)
            cols["tgt"].append(query[j]), cols["ans"].append(j >= len(prompt))
            cols["fact"].append(q.kind != "locality"), cols["q"].append(b)
    s_ids, s_mask = _pad(students, pad, device)
    enc = Encoded(s_ids, s_mask, *(torch.tensor(cols[k], device=device) for k in ("rows", "s", "tgt")),
                  torch.tensor(cols["ans"], device=device), torch.tensor(cols["fact"], device=device),
                  torch.tensor(cols["q"], device=device))
    if fact_texts is not None:
        enc.teacher_ids, enc.teacher_mask = _pad(teachers, pad, device)
        enc.t_cols = torch.tensor(cols["t"], device=device)
    return enc


def _logp(model, ids, mask, rows, cols) -> torch.Tensor:
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # [B, T, V]
    return logits[rows, cols].float().log_softmax(dim=-1)  # [P, V]


@torch.no_grad()
def teacher_targets(model, addon, enc: Encoded) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher log-probs [P, V], token weights w [P]) from the frozen base (no pool is read)."""
    with addon.use(None):
        with_fact = _logp(model, enc.teacher_ids, enc.teacher_mask, enc.s_rows, enc.t_cols)  # [P, V]
        without = _logp(model, enc.student_ids, enc.student_mask, enc.s_rows, enc.s_cols)  # [P, V]
    tgt = enc.targets[:, None]  # [P, 1]
    gain = without.gather(1, tgt)[:, 0] - with_fact.gather(1, tgt)[:, 0]  # [P] = CE_with - CE_without
    w = (-gain).clamp(min=0) * (enc.answer & enc.with_fact)  # [P] max(0, CE_without - CE_with)
    teacher = torch.where(enc.with_fact[:, None], with_fact, without)  # [P, V]
    return teacher, w


def student_loss(model, addon, enc: Encoded, gists, teacher: torch.Tensor, w: torch.Tensor):
    """(loss, stats): mean over scored positions of w * CE + KL(teacher || student)."""
    with addon.use(gists):
        student = _logp(model, enc.student_ids, enc.student_mask, enc.s_rows, enc.s_cols)  # [P, V]
    ce = -student.gather(1, enc.targets[:, None])[:, 0]  # [P]
    kl = F.kl_div(student, teacher, reduction="none", log_target=True).sum(dim=-1)  # [P] KL(teacher || student)
    n = max(int(ce.numel()), 1)
    loss = ((w * ce).sum() + kl.sum()) / n
    with torch.no_grad():
        answer = enc.answer & enc.with_fact  # [P]
        any_answer = bool(answer.any())
        stats = {"loss": loss.item(), "kl": kl.mean().item(), "wce": ((w * ce).sum() / n).item(),
                 "ce_answer": ce[answer].mean().item() if any_answer else 0.0,
                 "w_mean": w[answer].mean().item() if any_answer else 0.0}
    return loss, stats


def _token_hits(hits: torch.Tensor, enc: Encoded, n_queries: int) -> float:
    """Sum over queries of the fraction of answer tokens where `hits` holds."""
    keep = enc.answer  # [P]
    h, q = hits[keep].float(), enc.query_of[keep]  # [A], [A]
    per_query = torch.zeros(n_queries, device=h.device).index_add_(0, q, h)  # [n]
    counts = torch.zeros(n_queries, device=h.device).index_add_(0, q, torch.ones_like(h))  # [n]
    return float((per_query / counts.clamp(min=1)).sum())


def _score(model, tokenizer, addon, gists, queries: Sequence[Query], locality: bool, batch_size: int):
    """(with-pool score, base score) summed over queries; locality = agreement with the base argmax."""
    device = addon.gist_embedding.device
    total, total_base = 0.0, 0.0
    for start in range(0, len(queries), batch_size):
        chunk = queries[start:start + batch_size]
        enc = encode(tokenizer, chunk, None, device)
        with addon.use(gists):
            logits = model(input_ids=enc.student_ids, attention_mask=enc.student_mask).logits  # [B, T, V]
        pred = logits[enc.s_rows, enc.s_cols].argmax(-1)  # [P]
        with addon.use(None):
            logits = model(input_ids=enc.student_ids, attention_mask=enc.student_mask).logits  # [B, T, V]
        base = logits[enc.s_rows, enc.s_cols].argmax(-1)  # [P]
        total += _token_hits(pred == (base if locality else enc.targets), enc, len(chunk))
        total_base += _token_hits(base == enc.targets, enc, len(chunk))
    return total, total_base


@torch.no_grad()
def heldout_check(model, tokenizer, addon, facts: Sequence[TrainFact], batch_size: int = 16) -> dict:
    """Teacher-forced edit success, rephrase and locality (argmax agreement with the base model),
    with all `facts` in one pool, in eval mode (so T = 0.45 applies above 10 gists)."""
    was_training = addon.training
    addon.eval()
    try:
        gists = compress_texts(model, tokenizer, addon, [f.text for f in facts])
        kinds = {"edit_success": [f.edit for f in facts],
                 "rephrase": [f.paraphrases[0] for f in facts if f.paraphrases],
                 "locality": [f.locality[0] for f in facts if f.locality]}
        out: dict = {"n_gists": len(facts)}
        for name, queries in kinds.items():
            if not queries:
                continue
            score, base = _score(model, tokenizer, addon, gists, queries, name == "locality", batch_size)
            out[name] = score / len(queries)
            if name != "locality":
                out[name + "_base"] = base / len(queries)
    finally:
        addon.train(was_training)
    return out
