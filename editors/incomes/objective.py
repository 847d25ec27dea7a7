"""The InComeS training objective and the held-out check (DESIGN §1.2).

Per query token: loss = w * CE_student + KL(teacher || student), with
w = max(0, CE_teacher_without_fact - CE_teacher_with_fact) on answer tokens (0 elsewhere).
The teacher is the frozen base model (the same model with no pool: bit-identical) fed
`[fact text, "\\n", query]`; the student reads the query alone with a pool of gists. Locality queries
use the no-fact teacher, so the student learns to "attend to nothing" (w = 0 there).
P below is the number of scored query positions in a batch, V the vocabulary.

Queries are tokenised as evaluation/metrics.py does (`encode_target`: the ids of `prompt + " " +
answer`, the answer starting where they leave the prompt's own ids), so the held-out numbers are the
harness's teacher-forced edit success, rephrase and locality. Tokenisation is memoised (`Tokens`), and
only the scored positions go through the LM head, in float32 (also under bf16 autocast).
"""
from __future__ import annotations

import contextlib
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from editors.incomes.compress import compress_ids, pad_rows
from editors.incomes.introspect import find_layer_stack
from editors.incomes.packing import hidden_at
from editors.incomes.traindata import Query, TrainFact
from evaluation.metrics import join_prompt_target


class Tokens:
    """Memoised token ids: fact texts (with the tokenizer's special tokens) and queries (ids, answer start).

    `warm()` tokenises many strings in one batched call, which is far faster than one call per string.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.prefix = list(tokenizer("")["input_ids"])  # [] or [BOS]: what the tokenizer puts first
        self.newline = list(tokenizer("\n", add_special_tokens=False)["input_ids"])
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._texts: dict[str, list[int]] = {}
        self._queries: dict[tuple[str, str], tuple[list[int], int]] = {}

    def text(self, text: str) -> list[int]:
        ids = self._texts.get(text)
        if ids is None:
            ids = self._texts[text] = list(self.tokenizer(text)["input_ids"])
        return ids

    def query(self, prompt: str, answer: str) -> tuple[list[int], int]:
        """(ids of prompt + " " + answer, index of the answer's first token), as metrics.encode_target."""
        key = (prompt, answer)
        hit = self._queries.get(key)
        if hit is None:
            hit = self._queries[key] = self._split(self.text(join_prompt_target(prompt, answer)), self.text(prompt))
        return hit

    @staticmethod
    def _split(ids: list[int], head: list[int]) -> tuple[list[int], int]:
        start = 0
        while start < min(len(ids), len(head)) and ids[start] == head[start]:
            start += 1
        start = max(start, 1)  # the first token has no logits before it
        if start >= len(ids):
            start = len(ids) - 1  # degenerate (answer merged away): score the last token
        return ids, start

    def warm(self, texts: Iterable[str], queries: Iterable[Query] = (), chunk: int = 4096) -> None:
        """Tokenise every fact text and query (prompt, and prompt + answer) in a few batched calls."""
        wanted = set(texts)
        for q in queries:
            wanted.update((q.prompt, join_prompt_target(q.prompt, q.answer)))
        todo = sorted(t for t in wanted if t not in self._texts)
        for start in range(0, len(todo), chunk):
            part = todo[start:start + chunk]
            for text, ids in zip(part, self.tokenizer(part)["input_ids"]):
                self._texts[text] = list(ids)


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
    after: torch.Tensor | None = None  # [P] bool: a position after a query's answer (continuation, after_answer)


def encode(tokens, queries: Sequence[Query], fact_texts: Sequence[str] | None, device,
           after_answer: bool = False, continuations: Sequence[Sequence[int]] | None = None) -> Encoded:
    """Token ids for student (and teacher, when fact_texts is given), with aligned scored positions.
    `tokens` is a `Tokens` (or a tokenizer, wrapped in a fresh one). With `after_answer`, each query also
    scores the position after its last token (no target: KL only), so the student learns from the teacher
    what follows the answer, not only the answer (greedy text otherwise repeats the gist's answer).
    `continuations` (token ids per query, may be empty) go on after the answer and are scored too, as
    positions after the answer (KL only): the student learns to stop reading the answer into later text."""
    if not isinstance(tokens, Tokens):
        tokens = Tokens(tokens)
    n_prefix = len(tokens.prefix)
    students, teachers = [], []
    rows, s_cols, t_cols, tgt, ans, fact, after = [], [], [], [], [], [], []
    for b, q in enumerate(queries):
        ids, start = tokens.query(q.prompt, q.answer)
        answer_end = len(ids)
        if continuations is not None and continuations[b]:
            ids = ids + list(continuations[b])
        students.append(ids)
        head = (tokens.text(fact_texts[b]) + tokens.newline) if fact_texts is not None else []
        teachers.append(head + ids[n_prefix:])
        shift = len(head) - n_prefix  # teacher position = student position + shift
        first = max(1, n_prefix)
        n = len(ids) - first
        rows += [b] * n
        s_cols += range(first - 1, len(ids) - 1)
        t_cols += range(first - 1 + shift, len(ids) - 1 + shift)
        tgt += ids[first:]
        ans += [start <= j < answer_end for j in range(first, len(ids))]
        after += [j >= answer_end for j in range(first, len(ids))]
        if after_answer:  # the last token's logits: what comes after the answer (w = 0 there, not an answer)
            rows.append(b)
            s_cols.append(len(ids) - 1)
            t_cols.append(len(ids) - 1 + shift)
            tgt.append(tokens.pad)
            ans.append(False)
            after.append(True)
            n += 1
        fact += [q.kind != "locality"] * n
    s_ids, s_mask = pad_rows(students, tokens.pad, device)
    as_t = lambda x, dtype=torch.long: torch.tensor(x, dtype=dtype).to(device, non_blocking=True)  # noqa: E731
    enc = Encoded(s_ids, s_mask, as_t(rows), as_t(s_cols), as_t(tgt), as_t(ans, torch.bool),
                  as_t(fact, torch.bool), as_t(rows), after=as_t(after, torch.bool))
    if fact_texts is not None:
        enc.teacher_ids, enc.teacher_mask = pad_rows(teachers, tokens.pad, device)
        enc.t_cols = as_t(t_cols)
    return enc


def continuations(tokens: Tokens, facts, n: int, rng: random.Random, prob: float) -> list[list[int]] | None:
    """Per query, with probability `prob`, a new line and another train fact's sentence (ids without the
    tokenizer's prefix): the text a greedy continuation after the answer looks like."""
    if prob <= 0:
        return None
    skip = len(tokens.prefix)
    return [tokens.text("\n" + facts[rng.randrange(len(facts))].text)[skip:] if rng.random() < prob else []
            for _ in range(n)]


def _logits_at(model, ids, mask, rows, cols) -> torch.Tensor:
    """float32 logits [P, V] at (rows, cols) only: the decoder, then the LM head on P positions."""
    decoder, _ = find_layer_stack(model)
    h = hidden_at(decoder, ids, mask, rows, cols)  # [P, C], packed when mostly padding
    head = model.get_output_embeddings()
    autocast_off = torch.autocast(h.device.type, enabled=False) if torch.is_autocast_enabled(h.device.type) \
        else contextlib.nullcontext()
    with autocast_off:
        bias = head.bias.float() if getattr(head, "bias", None) is not None else None
        logits = F.linear(h.float(), head.weight.float(), bias)  # [P, V]
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap  # Gemma's final soft cap, as its ForCausalLM applies it
    return logits


def _logp(model, ids, mask, rows, cols) -> torch.Tensor:
    return _logits_at(model, ids, mask, rows, cols).log_softmax(dim=-1)  # [P, V]


@torch.no_grad()
def teacher_targets(model, addon, enc: Encoded) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher log-probs [P, V], token weights w [P]) from the frozen base (no pool is read).

    The with-fact and without-fact sequences go through one forward (packed when mostly padding)."""
    B, P = enc.student_ids.shape[0], enc.s_rows.shape[0]
    width = max(enc.teacher_ids.shape[1], enc.student_ids.shape[1])
    ids = torch.cat([F.pad(enc.teacher_ids, (0, width - enc.teacher_ids.shape[1]), value=0),
                     F.pad(enc.student_ids, (0, width - enc.student_ids.shape[1]), value=0)])  # [2B, T]
    mask = torch.cat([F.pad(enc.teacher_mask, (0, width - enc.teacher_mask.shape[1])),
                      F.pad(enc.student_mask, (0, width - enc.student_mask.shape[1]))])  # [2B, T]
    with addon.use(None):
        both = _logp(model, ids, mask, torch.cat([enc.s_rows, enc.s_rows + B]),
                     torch.cat([enc.t_cols, enc.s_cols]))  # [2P, V]
    with_fact, without = both[:P], both[P:]  # [P, V] each
    tgt = enc.targets[:, None]  # [P, 1]
    gain = without.gather(1, tgt)[:, 0] - with_fact.gather(1, tgt)[:, 0]  # [P] = CE_with - CE_without
    w = (-gain).clamp(min=0) * (enc.answer & enc.with_fact)  # [P] max(0, CE_without - CE_with)
    teacher = torch.where(enc.with_fact[:, None], with_fact, without)  # [P, V]
    return teacher, w


def student_loss(model, addon, enc: Encoded, gists, teacher: torch.Tensor, w: torch.Tensor,
                 ce_weight: float = 1.0, locality_weight: float = 1.0, after_answer_weight: float = 1.0,
                 later_answer_weight: float = 1.0):
    """(loss, stats): mean over scored positions of ce_weight * w * CE + k * KL(teacher || student),
    where k is `locality_weight` on the tokens of locality queries, `after_answer_weight` at the position
    after a fact query's answer, and 1 elsewhere; both terms are multiplied by `later_answer_weight` on a fact
    query's answer tokens after its first (the tokens a gist gets least often).

    stats are detached 0-d tensors (no host sync here; call .item() when logging)."""
    with addon.use(gists):
        student = _logp(model, enc.student_ids, enc.student_mask, enc.s_rows, enc.s_cols)  # [P, V]
    ce = -student.gather(1, enc.targets[:, None])[:, 0]  # [P]
    kl = F.kl_div(student, teacher, reduction="none", log_target=True).sum(dim=-1)  # [P] KL(teacher || student)
    n = max(int(ce.numel()), 1)
    later = _later_answer_tokens(enc) & enc.with_fact  # [P]
    if later_answer_weight != 1.0:
        w = torch.where(later, w * later_answer_weight, w)  # [P]
    wce = (w * ce).sum() / n
    k = torch.where(enc.with_fact, 1.0, float(locality_weight))  # [P]
    if enc.after is not None and after_answer_weight != 1.0:
        k = torch.where(enc.after & enc.with_fact, float(after_answer_weight), k)  # [P]
    if later_answer_weight != 1.0:
        k = torch.where(later, float(later_answer_weight), k)  # [P]
    loss = ce_weight * wce + (k * kl).sum() / n
    with torch.no_grad():
        answer = (enc.answer & enc.with_fact).float()  # [P] answer tokens of fact queries
        loc = (enc.answer & ~enc.with_fact).float()  # [P] answer tokens of locality queries
        hit = (student.argmax(-1) == enc.targets).float()  # [P]
        teacher_hit = (student.argmax(-1) == teacher.argmax(-1)).float()  # [P]
        n_ans, n_loc = answer.sum().clamp(min=1), loc.sum().clamp(min=1)
        stats = {"loss": loss.detach(), "kl": kl.mean(), "wce": wce.detach(),
                 "ce_answer": (ce * answer).sum() / n_ans, "w_mean": (w * answer).sum() / n_ans,
                 "acc_answer": (hit * answer).sum() / n_ans, "kl_locality": (kl * loc).sum() / n_loc,
                 "acc_later": (hit * later).sum() / later.sum().clamp(min=1),
                 "agree_locality": (teacher_hit * loc).sum() / n_loc}
    return loss, stats


def _token_hits(hits: torch.Tensor, enc: Encoded, n_queries: int) -> torch.Tensor:
    """Sum over queries of the fraction of answer tokens where `hits` holds (a 0-d tensor)."""
    keep = enc.answer.float()  # [P]
    per_query = torch.zeros(n_queries, device=hits.device).index_add_(0, enc.query_of, hits.float() * keep)
    counts = torch.zeros(n_queries, device=hits.device).index_add_(0, enc.query_of, keep)  # [n]
    return (per_query / counts.clamp(min=1)).sum()


def _later_answer_tokens(enc: Encoded) -> torch.Tensor:
    """[P] bool: answer tokens after a query's first one (multi-token answers only)."""
    previous = torch.roll(enc.answer, 1) & (torch.roll(enc.query_of, 1) == enc.query_of)  # [P]
    previous[0] = False
    return enc.answer & previous


def _score(model, tokens, addon, gists, queries: Sequence[Query], locality: bool, batch_size: int):
    """(with-pool score, base score, later-token hits, later-token count), the scores summed over queries;
    locality = agreement with the base argmax. The later tokens are counted one by one over all queries."""
    device = addon.gist_embedding.device
    total, total_base = torch.zeros((), device=device), torch.zeros((), device=device)
    later_hits, later_n = torch.zeros((), device=device), torch.zeros((), device=device)
    for start in range(0, len(queries), batch_size):
        chunk = queries[start:start + batch_size]
        enc = encode(tokens, chunk, None, device)
        with addon.use(gists):
            pred = _logits_at(model, enc.student_ids, enc.student_mask, enc.s_rows, enc.s_cols).argmax(-1)  # [P]
        with addon.use(None):
            base = _logits_at(model, enc.student_ids, enc.student_mask, enc.s_rows, enc.s_cols).argmax(-1)  # [P]
        hits = pred == (base if locality else enc.targets)  # [P]
        total += _token_hits(hits, enc, len(chunk))
        total_base += _token_hits(base == enc.targets, enc, len(chunk))
        later = _later_answer_tokens(enc)  # [P]
        later_hits += (hits & later).sum()
        later_n += later.sum()
    return total, total_base, later_hits, later_n


def _own_subject_probes(fact: TrainFact) -> list[Query]:
    """The fact's locality queries that ask its own subject (another relation): the mention gate lets these
    read the gist at inference, so only the learned selection keeps them local."""
    return [q for q in fact.locality if fact.subject and fact.subject in q.prompt]


@torch.no_grad()
def heldout_check(model, tokenizer, addon, facts: Sequence[TrainFact], batch_size: int = 16,
                  pool_size: int | None = None, tokens: Tokens | None = None, compress_batch: int = 128) -> dict:
    """Teacher-forced edit success, rephrase, locality and subject locality (argmax agreement with the base
    model; subject locality over the facts whose probes ask their own subject), in eval mode (so T = 0.45
    applies above 10 gists), the metrics.py definitions.

    The facts are split into pools of `pool_size` (default: all in one pool); each fact's queries read
    the pool that holds it among the others. The numbers are means over all queries."""
    tokens = tokens or Tokens(tokenizer)
    pool_size = pool_size or len(facts)
    was_training = addon.training
    addon.eval()
    sums = {k: 0.0 for k in ("edit_success", "edit_success_base", "rephrase", "rephrase_base", "locality",
                             "subject_locality")}
    later = [0.0, 0.0]  # edit queries: answer tokens after the first that the pool gets right, and their count
    counts = {"edit_success": 0, "rephrase": 0, "locality": 0, "subject_locality": 0}
    try:
        for first in range(0, len(facts), pool_size):
            group = facts[first:first + pool_size]
            gists = compress_ids(model, addon, [tokens.text(f.text) for f in group], compress_batch,
                                 pad_id=tokens.pad)
            kinds = {"edit_success": [f.edit for f in group],
                     "rephrase": [f.paraphrases[0] for f in group if f.paraphrases],
                     "locality": [f.locality[0] for f in group if f.locality],
                     "subject_locality": [q for f in group for q in _own_subject_probes(f)[:1]]}
            for name, queries in kinds.items():
                if not queries:
                    continue
                locality = name.endswith("locality")
                score, base, later_hits, later_n = _score(model, tokens, addon, gists, queries, locality,
                                                          batch_size)
                if name == "edit_success":
                    later[0], later[1] = later[0] + float(later_hits), later[1] + float(later_n)
                sums[name] += float(score)
                counts[name] += len(queries)
                if not locality:
                    sums[name + "_base"] += float(base)
    finally:
        addon.train(was_training)
    out: dict = {"n_gists": min(pool_size, len(facts)), "n_facts": len(facts)}
    if later[1]:
        out["later_tokens"] = later[0] / later[1]  # the edit prompts' answer tokens after the first
    for name, n in counts.items():
        if n:
            out[name] = sums[name] / n
            if not name.endswith("locality"):
                out[name + "_base"] = sums[name + "_base"] / n
    return out
