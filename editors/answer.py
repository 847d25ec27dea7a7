"""Greedy answers from a causal LM, batched with left padding. Shared by ask, chat, demo and evaluation."""
from __future__ import annotations

from collections.abc import Sequence

import torch


@torch.no_grad()
def generate_greedy(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 12, batch_size: int = 16,
                    stop_at_newline: bool = True) -> list[str]:
    """The greedy continuation of each prompt (the new text only)."""
    outputs: list[str] = []
    device = next(model.parameters()).device
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends on the right, so pad on the left
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start:start + batch_size])
            enc = tokenizer(chunk, return_tensors="pt", padding=True).to(device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                 pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None)
            new_tokens = out[:, enc["input_ids"].shape[1]:]
            for row in tokenizer.batch_decode(new_tokens, skip_special_tokens=True):
                outputs.append(row.split("\n")[0].strip() if stop_at_newline and row.strip() else row.strip())
    finally:
        tokenizer.padding_side = old_side
    return outputs


def chat_prompt(tokenizer, question: str, system: str | None = None) -> str:
    """Wrap a question in the model's chat template when it has one."""
    if not getattr(tokenizer, "chat_template", None):
        return question
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
