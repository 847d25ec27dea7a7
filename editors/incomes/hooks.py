"""How the gist add-on is attached to a base model: forward hooks, never module swaps.

Why hooks and not a PEFT-style wrapper swapped in with setattr: a wrapper renames every base key
(`self_attn.q_proj` -> `self_attn.base.q_proj`), which breaks checkpoints and the ICE editor's
parameter names, and reimplementing the attention forward copies transformers internals that change
between versions. With hooks the library's own self-attention code runs untouched, the base state
dict keeps its keys and tensors, and with no pool the branch hooks return None: the base model's
computation is exactly what it was, so logits are bit-identical by construction.

Per forward of the decoder:
1. decoder pre-hook: forget the previous forward's per-call state; note whether the forward continues
   a cached sequence (a decoding step) or starts new ones;
2. embedding pre-hook: find <GIST> tokens, mark the tokens after the last one in each row as
   allowed to read the pool, map the gist id to a valid row (it may lie past the embedding matrix);
   when pool rows carry anchors, work out which rows each sequence may read (the mention gate); while
   recording (`GistRuntime.reads`), note the rows some sequence may read;
   embedding hook: put the add-on's gist embedding at those positions;
3. upper-layer attention pre-hook: keep (hidden_states, (cos, sin)) for the gist branch; in the
   compression pass, compute the gist position's K (pre-RoPE, after k_norm) and V;
4. o_proj pre-hook: add the gist branch's output to o_proj's input (per-head, before o_proj);
5. compression-pass LoRA forward hooks on the target projections, active only while compressing;
6. output-embedding hook: the answer copy (editors/incomes/answer_copy) on the rows the gates let a
   sequence read, when the pool's rows carry answers.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from editors.causal import prompt_parts
from editors.incomes.anchor_index import AnchorIndex
from editors.incomes.answer_copy import ANSWER_END, DEFAULT_MARGIN, answer_ends, apply_copy, copy_targets
from editors.incomes.introspect import (GistHookError, attention_of, check_attention_signature,
                                        find_layer_stack, rope_function, split_call)


@dataclass
class BoundPool:
    """A pool view as the hooks read it: per upper layer (keys, values), each [N, KVH, D]."""

    kv: dict[int, tuple[torch.Tensor, torch.Tensor]]
    n: int
    anchors: list[list[str]] = field(default_factory=list)  # per row, anchors as id strings; [] = no gate
    relations: tuple = ()  # per row, the text of what it answers or None; () = no relation gate
    answers: list[list[str]] = field(default_factory=list)  # per row, answer forms as id strings; [] = no copy
    # the mention gate's lookup: an AnchorIndex over the rows' anchors, keyed by row, or by fact id with
    # `row_of` (fact id -> row: a pool's shared index, which may hold other views' facts too)
    index: AnchorIndex | None = None
    row_of: dict | None = None
    unanchored: list[int] | None = None  # the rows without anchors: every sequence reads them
    # the view the tensors come from (PoolView): `kv` is then filled per layer on first use, and a gathered
    # read takes the rows it needs from the view's blocks; layer -> position in the view's layers
    source: object | None = None
    layer_pos: dict[int, int] = field(default_factory=dict)

    def has(self, layer: int) -> bool:
        return layer in self.kv or layer in self.layer_pos

    def whole(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All rows' (keys, values) [N, KVH, D] of upper layer `layer`."""
        if layer not in self.kv:
            at = self.layer_pos[layer]
            self.kv[layer] = (self.source.keys[at], self.source.values[at])
        return self.kv[layer]

    def gather(self, layer: int, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) [n, KVH, D] of `rows` (ascending) in upper layer `layer`."""
        if self.source is None or layer in self.kv:
            keys, values = self.whole(layer)
            return keys.index_select(0, rows), values.index_select(0, rows)
        return self.source.gather(self.layer_pos[layer], rows.tolist())

    def __post_init__(self):
        if self.anchors and self.index is None:
            self.index = AnchorIndex()
            for row, forms in enumerate(self.anchors):
                self.index.add(row, [[ord(c) for c in a] for a in forms])
        if self.anchors and self.unanchored is None:
            self.unanchored = [row for row, forms in enumerate(self.anchors) if not forms]

    def mentioned(self, tokens: list[int], start: int = 0) -> set[int]:
        """The rows whose anchors occur in `tokens` from `start` on."""
        found = self.index.mentioned(tokens, start)
        if self.row_of is None:
            return found
        return {self.row_of[f] for f in found if f in self.row_of}


def id_string(ids) -> str:
    """Token ids as a string, one character per id, so `in` finds a contiguous id subsequence."""
    return "".join(map(chr, ids))


@dataclass
class GistRuntime:
    """Per-model mutable state shared by the hooks of one attached add-on."""

    pool: BoundPool | None = None
    read: torch.Tensor | None = None  # [B, T] bool: tokens after the last <GIST> of their row
    gist_mask: torch.Tensor | None = None  # [B, T] bool: where the <GIST> tokens are
    stash: dict = field(default_factory=dict)  # layer -> (hidden [B, T, C], (cos, sin))
    capture_at: tuple[torch.Tensor, torch.Tensor] | None = None  # (rows, cols) while compressing
    captured: dict = field(default_factory=dict)  # layer -> (K [N, KVH, D], V [N, KVH, D])
    continuing: bool = False  # this forward extends cached sequences (a decoding step)
    history: list[list[int]] | None = None  # per sequence: its prompt tokens so far, for the mention gate
    mentions: list[set[int]] | None = None  # per sequence: the rows its tokens so far mention
    # the gathered read: the branch attends over the pool rows `rows` alone (None: all N rows), and `visible`
    # [B, len(rows)] says which of them each sequence may read (None: every one)
    rows: torch.Tensor | None = None
    visible: torch.Tensor | None = None
    visible_sets: list[set[int]] | None = None  # per sequence: the pool rows it may read (None: all)
    readable: list[int] | None = None  # per sequence: how many rows it may read (host ints)
    # the relation gate (editors/incomes/relation_gate): (sequence ids, mentioned rows, pool) -> rows it
    # may read; asked once per sequence, when it starts, so a decoding step keeps its sequence's answer
    relation_check: Callable[[list[int], list[int], BoundPool], set[int]] | None = None
    relation_allowed: list[set[int]] | None = None
    answer_copy: bool = True  # finish an answer a sequence has begun (editors/incomes/answer_copy)
    copy_margin: float = DEFAULT_MARGIN
    copy_at: list | None = None  # this forward's (sequence, position, token) copies
    copy_length: int = 0  # this forward's number of positions (its logits may cover only the last ones)
    copy_history: list[str] | None = None  # per sequence: all its tokens so far (id string), targets included
    copy_prompt_ends: list[int] | None = None  # per sequence: where its prompt ends in copy_history
    # () -> [V] bool: the tokens that lengthen a word (none may follow an answer's end); asked for only when
    # an answer ends, since building it decodes the whole vocabulary (~0.5 s, then cached)
    word_continuing: Callable[[], torch.Tensor] | None = None
    # the rows (indices of the bound pool) some forward let a sequence read, after every gate: an answer's
    # provenance (GistMemory.reading). None: not recording
    reads: set[int] | None = None

    def set_pool(self, view, layer_ids: tuple[int, ...]) -> None:
        if view is None or len(view) == 0:
            self.pool = None if view is None else BoundPool({}, 0)
            return
        layers = tuple(view.layers)
        missing = [i for i in layer_ids if i not in layers]
        if missing:
            raise GistHookError(f"pool view lacks gists for upper layers {missing}")
        bound = getattr(view, "bound_parts", None)
        parts = bound() if bound is not None else _bound_parts(view)  # a PoolView caches them per version
        if bound is not None:  # tensors taken per layer, or per row for a gathered read, when first needed
            self.pool = BoundPool({}, len(view), **parts, source=view,
                                  layer_pos={i: layers.index(i) for i in layer_ids})
        else:
            kv = {i: (view.keys[layers.index(i)], view.values[layers.index(i)]) for i in layer_ids}
            self.pool = BoundPool(kv, int(view.keys.shape[1]), **parts)
        self.relation_allowed = None  # row indices of another view

    def new_forward(self) -> None:
        self.read, self.gist_mask, self.visible, self.readable, self.copy_at = None, None, None, None, None
        self.rows, self.visible_sets = None, None
        self.stash.clear()

    def clear(self) -> None:
        self.new_forward()
        self.pool, self.capture_at, self.history, self.relation_allowed = None, None, None, None
        self.copy_history, self.mentions = None, None
        self.captured.clear()

    def visible_dense(self) -> torch.Tensor | None:
        """This forward's gate as [B, N] bool over the whole bound pool (None: every row readable)."""
        if self.visible_sets is None:
            return None
        dense = torch.zeros(len(self.visible_sets), self.pool.n, dtype=torch.bool)
        for b, rows in enumerate(self.visible_sets):
            dense[b, list(rows)] = True
        return dense

    def gate_by_mention(self, ids: torch.Tensor) -> None:
        """Set `visible` [B, N]: a row with anchors is readable by a sequence whose tokens (this forward's,
        after those of earlier forwards when decoding) contain one of its anchors, and, with a relation gate,
        whose sentence naming the subject asks what the row's relation text asks."""
        tokens = ids.tolist()
        id_lists = prompt_parts(tokens)  # teacher forcing: the target's tokens decide nothing
        pool = self.pool
        continuing = (self.continuing and self.history is not None and self.mentions is not None
                      and len(self.history) == len(id_lists))
        if not continuing:
            self.history, self.mentions = [[] for _ in id_lists], [set() for _ in id_lists]
        for seq, mentions, now in zip(self.history, self.mentions, id_lists):
            start = max(0, len(seq) - pool.index.longest + 1)  # an anchor may end in this forward's tokens
            seq.extend(now)
            mentions |= pool.mentioned(seq, start)
        mask = [set(m) for m in self.mentions]
        if self.relation_check is not None and pool.relations:
            if not continuing or self.relation_allowed is None:
                self.relation_allowed = [self._relation_allowed(seq, m) for seq, m in zip(id_lists, mask)]
            for m, allowed in zip(mask, self.relation_allowed):
                m.difference_update([i for i in m if pool.relations[i] is not None and i not in allowed])
        for m in mask:
            m.update(pool.unanchored)
        if self.answer_copy and pool.answers and self.capture_at is None:
            self.find_copies(tokens, mask, continuing, [len(r) for r in id_lists])  # may hide answered rows
        self.set_visible(mask, ids.device)

    def set_visible(self, mask: list[set[int]], device: torch.device) -> None:
        """Gather the rows some sequence may read (`mask`: per sequence, its readable rows), so the branch
        attends over them alone; nothing is gathered or masked when every sequence reads every row."""
        self.readable = [len(m) for m in mask]  # counted here once, not on the device in every layer
        self.note_reads(mask)
        if all(r == self.pool.n for r in self.readable):
            return
        self.visible_sets = mask
        rows = sorted(set().union(*mask))
        self.rows = torch.tensor(rows, dtype=torch.long, device=device)
        if any(r != len(rows) for r in self.readable):
            column = {row: j for j, row in enumerate(rows)}
            visible = torch.zeros(len(mask), len(rows), dtype=torch.bool)
            for b, m in enumerate(mask):
                visible[b, [column[r] for r in m]] = True
            self.visible = visible.to(device)  # [B, len(rows)]

    def note_reads(self, mask: list[set[int]] | None) -> None:
        """While recording, add the rows some sequence of this forward may read (`mask`: per sequence, the
        final readable rows; None: every row). A compression pass reads no pool, so it records nothing."""
        if self.reads is None or self.capture_at is not None or self.pool is None:
            return
        if mask is None:
            self.reads.update(range(self.pool.n))
        else:
            for m in mask:
                self.reads.update(m)

    def find_copies(self, tokens: list[list[int]], mask: list[list[bool]], continuing: bool, prompts: list[int]) -> None:
        """Set `copy_at` for this forward: where a sequence (all its tokens, a teacher-forced target's too:
        a position's logits depend only on the tokens up to it) has begun the answer of a row it may read,
        and take out of `mask` the rows whose answer it wrote before this forward.
        `tokens`: this forward's ids per row; `prompts`: the length of each row's prompt part in this forward
        (all of it outside teacher forcing)."""
        now = [id_string(r) for r in tokens]
        fresh = not continuing or self.copy_history is None
        before = [""] * len(now) if fresh else self.copy_history
        if fresh:
            self.copy_prompt_ends = prompts  # an answer written inside the prompt is not one the copy finished
        self.copy_history = [b + n for b, n in zip(before, now)]
        readable = [sorted(i for i in m if self.pool.anchors[i] and self.pool.answers[i]) for m in mask]
        self.copy_length = len(tokens[0])
        starts = [len(b) for b in before]
        ends = answer_ends(self.copy_history, self.pool.answers, readable, self.copy_prompt_ends)
        self.copy_at = copy_targets(self.copy_history, starts, self.pool.answers, readable, ends=ends)
        # a row is read until its answer is written: a forward that starts at or past the answer's last token
        # (a decoding step after it) no longer reads the row, so the text goes on as the model's own
        for b, done in enumerate(ends):
            for row, end in done.items():
                if end is not None and end <= starts[b]:
                    mask[b].discard(row)

    def _relation_allowed(self, seq: list[int], mentioned: set[int]) -> set[int]:
        rows = sorted(i for i in mentioned if self.pool.relations[i])
        return self.relation_check(seq, rows, self.pool) if rows else set()


def _bound_parts(view) -> dict:
    """What BoundPool needs of a view besides its tensors (anchors and answers as id strings)."""
    return {"anchors": [[id_string(a) for a in row] for row in getattr(view, "anchors", ())],
            "relations": tuple(getattr(view, "relations", ())),
            "answers": [[id_string(a) for a in row] for row in getattr(view, "answers", ())]}


def install(addon, model: nn.Module) -> list:
    """Register every hook of `addon` on `model`; returns the handles (remove() them to detach)."""
    decoder, layers = find_layer_stack(model)
    rt = addon.runtime
    handles = [decoder.register_forward_pre_hook(_decoder_pre(rt), with_kwargs=True)]
    emb = model.get_input_embeddings()
    handles.append(emb.register_forward_pre_hook(_embedding_pre(addon, emb.num_embeddings)))
    handles.append(emb.register_forward_hook(_embedding_post(addon)))
    for idx, layer in enumerate(layers):
        attn = attention_of(layer)
        if str(idx) in addon.branches:
            check_attention_signature(attn)
            rope_function(attn)  # fail at attach time, not at the first forward
            handles.append(attn.register_forward_pre_hook(_attention_pre(addon, idx, attn), with_kwargs=True))
            handles.append(attn.o_proj.register_forward_pre_hook(_o_proj_pre(addon, idx, attn)))
        for name in addon.config.compress_targets if len(addon.compress_lora) else ():
            lora = addon.compress_lora[f"{idx}_{name}"]
            handles.append(getattr(attn, name).register_forward_hook(_compress_lora(rt, lora)))
    head = model.get_output_embeddings()
    if head is not None:
        handles.append(head.register_forward_hook(_answer_copy(rt)))
    return handles


def _decoder_pre(rt: GistRuntime):
    def hook(module, args, kwargs):
        rt.new_forward()
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        try:
            rt.continuing = cache is not None and int(cache.get_seq_length()) > 0
        except (AttributeError, TypeError):  # a legacy tuple cache
            rt.continuing = bool(cache)
        return None

    return hook


def _embedding_pre(addon, num_embeddings: int):
    rt = addon.runtime

    def hook(module, args):
        ids = args[0]  # [B, T]
        if rt.pool is not None and rt.pool.anchors:
            rt.gate_by_mention(ids)
        elif rt.pool is not None:
            rt.note_reads(None)  # no anchors: nothing is masked, every row is read
        mask = ids == addon.gist_token_id  # [B, T]
        if not bool(mask.any()):
            return None
        pos = torch.arange(ids.shape[-1], device=ids.device)  # [T]
        last = torch.where(mask, pos, -1).amax(dim=-1, keepdim=True)  # [B, 1]
        rt.gist_mask, rt.read = mask, pos > last  # [B, T], [B, T]
        if addon.gist_token_id >= num_embeddings:
            return (ids.masked_fill(mask, 0), *args[1:])  # a valid row; replaced after the lookup
        return None

    return hook


def _embedding_post(addon):
    rt = addon.runtime

    def hook(module, args, output):
        if rt.gist_mask is None:
            return None
        embeddings = addon.gist_embeddings().to(output.dtype)  # [per_fact, C]
        if len(embeddings) == 1:
            return torch.where(rt.gist_mask[..., None], embeddings[0], output)  # [B, T, C]
        # a fact's gists are consecutive, so the running count of gists in a row says which of its gists this is
        which = (rt.gist_mask.long().cumsum(dim=-1) - 1).remainder(len(embeddings))  # [B, T]
        return torch.where(rt.gist_mask[..., None], embeddings[which], output)  # [B, T, C]

    return hook


def _attention_pre(addon, idx: int, attn: nn.Module):
    rt = addon.runtime
    kv_width = addon.dims.n_kv_heads, addon.dims.head_dim

    def hook(module, args, kwargs):
        if rt.capture_at is not None:
            hidden, _ = split_call(args, kwargs)
            rows, cols = rt.capture_at
            hg = hidden[rows, cols]  # [N, C], the <GIST> position of each fact
            k = attn.k_proj(hg).view(-1, *kv_width)  # [N, KVH, D], no RoPE: gists carry no position
            if isinstance(getattr(attn, "k_norm", None), nn.Module):
                k = attn.k_norm(k)  # [N, KVH, D], Gemma3 normalises keys before RoPE
            v = attn.v_proj(hg).view(-1, *kv_width)  # [N, KVH, D]
            rt.captured[idx] = (k, v)
        if rt.pool is not None and rt.pool.n and rt.pool.has(idx):
            rt.stash[idx] = split_call(args, kwargs)
        return None

    return hook


def _o_proj_pre(addon, idx: int, attn: nn.Module):
    rt = addon.runtime
    branch = addon.branches[str(idx)]
    width = addon.dims.n_heads * addon.dims.head_dim

    def hook(module, args):
        bound = rt.pool
        if bound is None or not bound.n or not bound.has(idx):
            return None  # empty pool: the gist branch is skipped, not added as zeros
        if idx not in rt.stash:
            raise GistHookError(
                f"layer {idx}: o_proj ran without its attention's pre-hook having seen hidden_states; "
                "the attention forward changed (transformers upgrade?)"
            )
        hidden, cos_sin = rt.stash.pop(idx)
        y = args[0]  # [B, T, H*D]
        if y.shape[-1] != width or y.shape[:-1] != hidden.shape[:-1]:
            raise GistHookError(f"layer {idx}: o_proj input {tuple(y.shape)} is not [B, T, {width}]")
        # the gathered read: only the rows some sequence may read, from the blocks that hold them
        keys, values = bound.whole(idx) if rt.rows is None else bound.gather(idx, rt.rows)
        readable = bound.n if rt.readable is None else rt.readable  # the pool's size, or rows per sequence
        out = branch(attn, hidden, cos_sin, y, keys, values, rt.read, addon.temperature(readable), rt.visible)
        return (out, *args[1:])

    return hook


def _answer_copy(rt: GistRuntime):
    def hook(module, args, output):
        if not rt.copy_at or not torch.is_tensor(output) or output.dim() != 3:
            return None  # no copy this forward: the logits are the model's own
        ends = rt.word_continuing is not None and any(c[2] == ANSWER_END for c in rt.copy_at)
        return apply_copy(output, rt.copy_at, rt.copy_length, rt.copy_margin,
                          rt.word_continuing() if ends else None)

    return hook


def _compress_lora(rt: GistRuntime, lora: nn.Module):
    def hook(module, args, output):
        if rt.capture_at is None:
            return None  # outside the compression pass the base projection is untouched
        return output + lora(args[0])  # [..., d_out]

    return hook
