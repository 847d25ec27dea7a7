"""Model commands: ask."""
from __future__ import annotations

import contextlib

from agent.commands.common import emit, load_state, open_gist


def cmd_ask(args) -> int:
    from editors.answer import chat_prompt, generate_greedy

    store, loaded, state = load_state(args)
    gist = open_gist(args, store, loaded)
    prompt = chat_prompt(loaded.tokenizer, args.prompt) if args.chat else args.prompt
    reading = gist.memory.reading(args.user) if gist else contextlib.nullcontext()
    with reading:
        answer = generate_greedy(loaded.model, loaded.tokenizer, [prompt], max_new_tokens=args.max_new_tokens)[0]
    emit(args, {"prompt": args.prompt, "answer": answer, "model": loaded.name, "model_version": state.version}, answer)
    return 0


def _configure_ask(p) -> None:
    p.add_argument("prompt", help="a prompt to complete (or a question with --chat)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--user", default=None, help="answer as this user (their scoped facts plus global ones)")
    p.add_argument("--gist-addon", default=None, help="directory of a trained gist add-on (default: the shipped one)")
    p.add_argument("--no-relation-gate", action="store_true",
                   help="let a query read every pooled fact whose subject it names, whatever it asks about it")
    p.add_argument("--no-answer-copy", action="store_true",
                   help="do not finish a begun answer of a readable fact from its stored tokens")


COMMANDS = {
    "ask": (cmd_ask, _configure_ask, "answer a prompt greedily with the current model"),
}
