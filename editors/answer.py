"""Greedy answers from a causal LM, batched with left padding. Shared by ask, chat, demo and evaluation."""
from __future__ import annotations

from collections.abc import Sequence

import torch


@torch.no_grad()
def generate_greedy(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 12, batch_size: int = 16,
                    stop_at_newline: bool = True) -> list[str]:
    """The greedy continuation of each prompt (the new text only).

    When the prompts share a long token prefix (ICL's facts block) it runs once for all of them.
    """
    from editors.prefix_cache import shared_prefix_for

    prompts = list(prompts)
    encoded = [list(tokenizer(p)["input_ids"]) for p in prompts]
    prefix = shared_prefix_for(model, encoded, min((len(e) for e in encoded), default=1) - 1)
    if prefix is not None:
        texts = []
        for start in range(0, len(prompts), batch_size):
            texts += _greedy_after_prefix(model, tokenizer, prefix, encoded[start:start + batch_size], max_new_tokens)
    else:
        texts = _greedy_generate(model, tokenizer, prompts, max_new_tokens, batch_size)
    return [t.split("\n")[0].strip() if stop_at_newline and t.strip() else t.strip() for t in texts]


def _greedy_generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    outputs: list[str] = []
    device = next(model.parameters()).device
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends on the right, so pad on the left
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True).to(device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                 pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None)
            outputs += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = old_side
    return outputs


def _greedy_after_prefix(model, tokenizer, prefix, encoded: list[list[int]], max_new_tokens: int) -> list[str]:
    """Greedy decoding of [shared prefix | own tokens], the own tokens left-padded *after* the prefix.

    Padding sits between the prefix and each row's tokens, masked out, with explicit positions, so every
    row sees exactly its own prompt at its own positions.
    """
    from editors.prefix_cache import cache_of

    device = next(model.parameters()).device
    suffixes = [ids[prefix.length:] for ids in encoded]
    width = max(len(s) for s in suffixes)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(suffixes), width), pad, dtype=torch.long, device=device)  # [B, S]
    mask = torch.zeros((len(suffixes), width), dtype=torch.long, device=device)  # [B, S]
    for row, suffix in enumerate(suffixes):
        ids[row, width - len(suffix):] = torch.tensor(suffix, device=device)
        mask[row, width - len(suffix):] = 1
    positions = (prefix.length + mask.cumsum(1) - 1).clamp(min=prefix.length)  # [B, S]
    cache = prefix.cache_for(len(suffixes))
    out = prefix.forward(ids, mask, positions, cache)
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)  # as generate() stops
    eos = torch.tensor([] if eos is None else [eos] if isinstance(eos, int) else list(eos), dtype=torch.long,
                       device=device)
    new = torch.empty((len(suffixes), 0), dtype=torch.long, device=device)
    done = torch.zeros(len(suffixes), dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        token = out.logits[:, -1].argmax(-1)  # [B]
        token = torch.where(done, torch.full_like(token, pad), token)
        new = torch.cat([new, token[:, None]], dim=1)
        done |= torch.isin(token, eos)
        if bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions[:, -1:] + 1
        out = prefix.forward(token[:, None], mask, positions, cache_of(out))
    return tokenizer.batch_decode(new, skip_special_tokens=True)


def chat_prompt(tokenizer, question: str, system: str | None = None) -> str:
    """Wrap a question in the model's chat template when it has one."""
    if not getattr(tokenizer, "chat_template", None):
        return question
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
