"""Fact commands: ingest, status, contexts, facts list|show|history|delete."""
from __future__ import annotations

from agent.commands.common import emit, load, note, open_store
from memory.errors import EngramError


def _configure_ingest(p) -> None:
    p.add_argument("file", help="a JSONL or CSV file, or - for standard input")
    p.add_argument("--format", default="auto", choices=["auto", "jsonl", "csv"])
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--contexts", action="store_true", help="generate paraphrase contexts for the new facts")
    p.add_argument("--route", default="store", choices=["store", "gist"],
                   help="store only (edit later with `engram edit`), or compress the new facts into the gist pool now")
    p.add_argument("--gist-addon", default=None, help="directory of a trained gist add-on (default: the shipped one)")
    p.add_argument("--generator", default="auto", choices=["auto", "openai", "local", "template"],
                   help="context generator: auto = OpenAI-compatible if ENGRAM_CONTEXT_BASE_URL is set, else the local model")


def cmd_ingest(args) -> int:
    from agent.ingest import ingest_path

    if args.batch_size < 1:
        raise EngramError("--batch-size must be at least 1")
    store = open_store(args)
    report = ingest_path(store, args.file, args.format, args.batch_size)
    payload = report.to_json()
    loaded = None
    if args.route == "gist" and report.fact_ids:
        from agent.commands.common import load_state

        _, loaded, _ = load_state(args)  # gists are compressed by the live (edited) model
    if args.contexts and report.fact_ids:
        from agent.enrich import enrich, generator_from_args

        if loaded is None and args.generator in ("auto", "local"):
            loaded = load(args)
        generator = generator_from_args(args.generator, loaded)
        facts = [store.get_fact(i) for i in report.fact_ids]
        made = enrich(store, [f for f in facts if f.status == "active"], generator)
        payload["contexts"] = {"facts": made.facts, "contexts": made.contexts, "failures": made.failures}
    if args.route == "gist" and report.fact_ids:
        from agent.commands.common import open_gist

        gist = open_gist(args, store, loaded, required=True)
        facts = [f for f in (store.get_fact(i) for i in report.fact_ids) if f.status == "active"]
        for old in gist.stale():
            gist.remove(old, reason="superseded or deleted")
        seconds = gist.add(facts)
        payload["gist"] = {"added": len(facts), "pool": len(gist.memory), "seconds": round(seconds, 3)}
    if not args.json:
        for error in report.errors:
            note(f"line {error.line}: {error.reason}")
        note(f"{report.facts_per_second:,.0f} facts/s over {report.seconds:.2f} s")
    text = report.summary()
    if "gist" in payload:
        text += f"\ngist pool: +{payload['gist']['added']} fact(s), {payload['gist']['pool']} in all"
    if "contexts" in payload:
        c = payload["contexts"]
        text += f"\ncontexts: {c['contexts']} for {c['facts']} facts ({c['failures']} generator failures)"
    emit(args, payload, text)
    return 0 if report.rejected == 0 else 1


def cmd_status(args) -> int:
    from editors.model import resolve_device

    store = open_store(args)
    counts = store.counts()
    counts["gist_pool"] = counts["edits"].get("gist", {}).get("applied", 0)
    counts["model"] = store.get_meta("model", args.model)
    counts["device"] = str(resolve_device(args.device))
    counts["db"] = store.url
    facts = counts["facts"]
    edit_lines = [f"  {backend}: " + ", ".join(f"{k} {v}" for k, v in sorted(st.items()))
                  for backend, st in sorted(counts["edits"].items())] or ["  none"]
    text = "\n".join([
        f"store    {store.url}",
        f"facts    active {facts['active']}, superseded {facts['superseded']}, deleted {facts['deleted']}",
        f"contexts {counts['contexts']}",
        "edits", *edit_lines,
        f"gist pool {counts['gist_pool']} facts",
        f"model    {counts['model']} on {counts['device']}",
    ])
    emit(args, counts, text)
    return 0


def cmd_contexts(args) -> int:
    store = open_store(args)
    fact = store.get_fact(args.fact_id)
    rows = store.contexts(args.fact_id)
    payload = {"fact_id": fact.id, "statement": fact.statement,
               "contexts": [{"text": c.text, "generator": c.generator} for c in rows]}
    lines = [f"fact {fact.id}: {fact.statement}"] + [f"  [{c.generator}] {c.text}" for c in rows]
    if not rows:
        lines.append("  (no contexts; `engram ingest --contexts` generates them)")
    emit(args, payload, "\n".join(lines))
    return 0


def _fact_json(fact) -> dict:
    keys = ("id", "subject", "relation", "prompt", "target", "text", "scope", "user_id", "status", "superseded_by", "created_at")
    return {k: getattr(fact, k) for k in keys}


def cmd_facts(args) -> int:
    store = open_store(args)
    if args.action == "list":
        status = None if args.status == "all" else args.status
        facts = store.list_facts(status=status, limit=args.limit, user_id=args.user)
        lines = [f"{f.id:>6}  {f.status:<10} {f.statement}" for f in facts] or ["(no facts)"]
        emit(args, {"facts": [_fact_json(f) for f in facts]}, "\n".join(lines))
        return 0
    if args.fact_id is None:
        raise EngramError(f"`engram facts {args.action}` needs a FACT_ID")
    if args.action == "show":
        fact = store.get_fact(args.fact_id)
        emit(args, _fact_json(fact), "\n".join(f"{k:<14}{v}" for k, v in _fact_json(fact).items()))
    elif args.action == "history":
        events = store.history(args.fact_id)
        emit(args, {"fact_id": args.fact_id, "events": [{"kind": e.kind, "detail": e.detail, "at": e.created_at} for e in events]},
             "\n".join(f"{e.created_at:%Y-%m-%d %H:%M:%S}  {e.kind:<16} {e.detail or ''}" for e in events))
    else:  # delete
        fact = store.delete_fact(args.fact_id, reason="deleted by user")
        emit(args, {"deleted": fact.id}, f"deleted fact {fact.id}")
    return 0


def _configure_facts(p) -> None:
    p.add_argument("action", choices=["list", "show", "history", "delete"])
    p.add_argument("fact_id", nargs="?", type=int)
    p.add_argument("--status", default="active", choices=["active", "superseded", "deleted", "all"])
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--user", default=None, help="only this user's facts (plus global ones)")


COMMANDS = {
    "ingest": (cmd_ingest, _configure_ingest, "read facts from JSONL or CSV into the store"),
    "status": (cmd_status, lambda p: None, "counts of facts, contexts, edits; the model and device"),
    "contexts": (cmd_contexts, lambda p: p.add_argument("fact_id", type=int), "show a fact's paraphrase contexts"),
    "facts": (cmd_facts, _configure_facts, "list, show, trace or delete facts"),
}
