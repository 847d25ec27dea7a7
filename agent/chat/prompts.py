"""Chat messages to one prompt string per route, with the provenance of what went into it.

Every route applies the tokenizer's chat template to the conversation. They differ in what else shapes
the answer: `engram` reads the gist pool (and runs on the edited weights), `base` reads nothing, and the
baselines put stored facts in the last user turn with the shared templates of editors/prompting
(`icl`: every fact visible to the user; `rag`: the top k by MiniLM; `rag-subject`: the top k of those
whose subject the question names, as evaluation/methods.RAGSubjectMethod does).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


class ChatInputError(ValueError):
    """A request the engine cannot answer as asked (the server's 400). `param` names the field."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def normalize_messages(messages: Sequence[dict]) -> list[dict]:
    """OpenAI messages as {"role", "content": str} dicts the chat templates take; a clear error otherwise.

    Text parts of a list content are joined; images, audio and tool turns cannot be honoured, so refused."""
    if not messages:
        raise ChatInputError("messages must hold at least one message", "messages")
    out = []
    for i, message in enumerate(messages):
        role = message.get("role")
        if role not in ROLES:
            raise ChatInputError(f"messages[{i}].role {role!r} is not supported (Engram has no tools); use "
                                 f"one of {', '.join(ROLES)}", f"messages[{i}].role")
        content = message.get("content")
        if content is None:
            content = ""
        elif isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ChatInputError("only text content parts are supported", f"messages[{i}].content[{j}]")
                parts.append(part["text"])
            content = "".join(parts)
        elif not isinstance(content, str):
            raise ChatInputError("content must be a string or a list of text parts", f"messages[{i}].content")
        out.append({"role": ROLES[role], "content": content})
    return out


def render(tokenizer, messages: list[dict]) -> str:
    """The tokenizer's chat template with the assistant's turn opened; a plain transcript without one."""
    if not getattr(tokenizer, "chat_template", None):
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # a template that refuses a role order (Gemma's alternation) is the caller's 400
        raise ChatInputError(f"the model's chat template refused these messages: {exc}", "messages") from exc


def last_user(messages: list[dict]) -> int:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] == "user":
            return i
    raise ChatInputError("this model id needs a user message to retrieve facts for", "messages")


def with_question(tokenizer, messages: list[dict], index: int) -> Callable[[str], str]:
    """A wrap for editors/prompting: the conversation with the user turn `index` replaced by its argument."""
    def wrap(text: str) -> str:
        return render(tokenizer, messages[:index] + [{"role": "user", "content": text}] + messages[index + 1:])
    return wrap


def visible(fact, user: str | None) -> bool:
    from memory.vector import fact_owner

    return fact_owner(fact) in (None, user)


@dataclass
class Prepared:
    """One request's prompt and the record of what shaped it (the response's `engram.provenance`)."""

    route: str
    prompt: str
    user: str | None
    provenance: dict = field(default_factory=dict)


def pool_rows(memory, tokenizer, prompt: str, user: str | None) -> dict:
    """The pool rows this user may read and those the prompt's mention gate opens, known before generation
    (the relation gate may narrow them, and generated tokens may mention more subjects: the rows the answer
    really read are its `rows_read`, which the engine adds once generation ends)."""
    from editors.incomes.mention import visible_facts

    view = memory.pool.view(user)
    ids = list(view.fact_ids)
    if not ids:
        return {"rows_in_view": 0, "rows_mentioned": []}
    anchors = [list(a) for a in view.anchors] if view.anchors else [[] for _ in ids]
    seen = visible_facts(tokenizer, [prompt], anchors)[0]
    return {"rows_in_view": len(ids), "rows_mentioned": [fid for fid, ok in zip(ids, seen) if ok]}


def icl(store, tokenizer, messages: list[dict], user: str | None, max_tokens: int) -> tuple[str, dict]:
    from editors.prompting import icl_prompt

    i = last_user(messages)
    facts = [f for f in store.list_facts(user_id=user) if visible(f, user)]  # oldest first, as ICL shows them
    built = icl_prompt([f.statement for f in facts], messages[i]["content"], tokenizer, max_tokens, style="chat",
                       wrap=with_question(tokenizer, messages, i))
    used = [f.id for f in facts[len(facts) - built.n_used:]] if built.n_used else []
    return built.prompt, {"icl_facts": used, "icl_cut": built.n_cut}


def rag(store, index, tokenizer, messages: list[dict], user: str | None, k: int,
        by_subject: bool = False) -> tuple[str, dict]:
    """RAG's prompt; `by_subject`: only facts whose subject the question names (none named: the plain chat)."""
    from editors.prompting import rag_prompt

    i = last_user(messages)
    question = messages[i]["content"]
    if by_subject:
        from editors.incomes.mention import subject_anchors, visible_facts

        facts = [f for f in store.list_facts(user_id=user) if visible(f, user)]
        seen = visible_facts(tokenizer, [question], [subject_anchors(tokenizer, f.subject) for f in facts])[0]
        allowed = {f.id for f, ok in zip(facts, seen) if ok}
        # every visible fact ranked by RAG's own scores, then cut to the named subjects (exact, as the method)
        hits = [h for h in index.search(question, k=max(len(index), 1), user_id=user) if h[0] in allowed][:k]
    else:
        hits = index.search(question, k=k, user_id=user)
    provenance = {"rag_hits": [{"fact_id": int(fid), "score": round(float(score), 4)} for fid, score in hits]}
    if not hits:
        return render(tokenizer, messages), provenance
    statements = [store.get_fact(fid).statement for fid, _ in hits]
    return with_question(tokenizer, messages, i)(rag_prompt(statements, question, style="chat")), provenance
