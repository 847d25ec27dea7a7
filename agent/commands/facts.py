"""Fact commands: ingest, status, contexts, facts list|show|history|delete."""
from __future__ import annotations

from pathlib import Path

from agent.commands.common import emit, load, note, open_store
from memory.errors import ConfigError, EngramError

CONTEXT_CHOICES = ("none", "template", "local", "openai", "auto")


def _configure_ingest(p) -> None:
    p.add_argument("file", help="a JSONL or CSV file, or - for standard input")
    p.add_argument("--format", default="auto", choices=["auto", "jsonl", "csv"])
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--contexts", default="none", choices=CONTEXT_CHOICES,
                   help="generate paraphrase contexts for the new facts with this generator (default: none); "
                        "auto = OpenAI-compatible if ENGRAM_CONTEXT_BASE_URL is set, else the local model")
    p.add_argument("--route", default="store", choices=["store", "gist"],
                   help="store only (edit later with `engram edit`), or compress the new facts into the gist pool now")
    p.add_argument("--gist-addon", default=None, help="directory of a trained gist add-on (default: the shipped one)")


def _context_generator_kind(choice: str) -> str:
    """The generator `--contexts` names, `auto` resolved as agent.enrich.generator_from_args resolves it."""
    if choice != "auto":
        return choice
    from agent.contexts import ContextConfig

    return "openai" if ContextConfig.from_env().base_url else "local"


def cmd_ingest(args) -> int:
    from agent.ingest import ingest_path
    from editors.gist_state import has_pending_gist

    if args.batch_size < 1:
        raise EngramError("--batch-size must be at least 1")
    if args.route == "gist" and args.gist_addon and not Path(args.gist_addon).is_dir():
        raise ConfigError(f"gist add-on directory {args.gist_addon} does not exist")  # before anything is stored
    kind = _context_generator_kind(args.contexts) if args.contexts != "none" else None  # env checked now too
    store = open_store(args, create=True)
    # Gist-routed facts are queued (pending gist edits) with the facts themselves: if the model or add-on
    # load below fails, or the process dies, the next open of the pool compresses them.
    report = ingest_path(store, args.file, args.format, args.batch_size,
                         pending_backend="gist" if args.route == "gist" else None)
    payload = report.to_json()
    loaded = None
    gist_due = args.route == "gist" and (bool(report.fact_ids) or has_pending_gist(store))
    if gist_due:
        from agent.commands.common import load_state

        _, loaded, _ = load_state(args)  # gists are compressed by the live (edited) model
    if kind is not None and report.fact_ids:
        from agent.enrich import enrich, generator_from_args

        if loaded is None and kind == "local":
            loaded = load(args)
        facts = [store.get_fact(i) for i in report.fact_ids]
        made = enrich(store, [f for f in facts if f.status == "active"], generator_from_args(kind, loaded))
        payload["contexts"] = {"facts": made.facts, "contexts": made.contexts, "failures": made.failures}
    if gist_due:
        from agent.commands.common import open_gist

        gist = open_gist(args, store, loaded, required=True)  # its open compresses the queued facts
        for old in gist.stale():
            gist.remove(old, reason="superseded or deleted")
        gist.add([f for f in (store.get_fact(i) for i in report.fact_ids) if f.status == "active"])
        payload["gist"] = {"added": len(gist.work.added), "pool": len(gist.memory),
                           "seconds": round(gist.work.seconds, 3)}
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
    store = open_store(args, create=False)
    counts = store.counts()
    counts["gist_pool"] = counts["edits"].get("gist", {}).get("applied", 0)
    counts["gist_pending"] = counts["edits"].get("gist", {}).get("pending", 0)
    # The model the store's edits were made on, as the store recorded it (status loads no model).
    counts["model"] = store.get_meta("model")
    counts["model_fingerprint"] = store.get_meta("model_fingerprint")
    counts["db"] = store.url
    from agent.router import route_counts

    counts["routes"] = route_counts(store)
    facts = counts["facts"]
    edit_lines = [f"  {backend}: " + ", ".join(f"{k} {v}" for k, v in sorted(st.items()))
                  for backend, st in sorted(counts["edits"].items())] or ["  none"]
    model = counts["model"] or "none recorded"
    if counts["model"] and counts["model_fingerprint"]:
        model += f" (fingerprint {counts['model_fingerprint'][:12]})"
    pending = f", {counts['gist_pending']} pending" if counts["gist_pending"] else ""
    text = "\n".join([
        f"store    {store.url}",
        f"facts    active {facts['active']}, superseded {facts['superseded']}, deleted {facts['deleted']}",
        f"contexts {counts['contexts']}",
        "edits", *edit_lines,
        f"gist pool {counts['gist_pool']} facts{pending}",
        "routes   " + ("; ".join(f"{route}: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items()))
                                  for route, c in sorted(counts["routes"].items()) if c.get("routed"))
                       or "none routed"),
        f"model    {model}",
    ])
    emit(args, counts, text)
    return 0


def cmd_contexts(args) -> int:
    store = open_store(args, create=False)
    fact = store.get_fact(args.fact_id)
    rows = store.contexts(args.fact_id)
    payload = {"fact_id": fact.id, "statement": fact.statement,
               "contexts": [{"text": c.text, "generator": c.generator} for c in rows]}
    lines = [f"fact {fact.id}: {fact.statement}"] + [f"  [{c.generator}] {c.text}" for c in rows]
    if not rows:
        lines.append("  (no contexts; `engram ingest --contexts auto` generates them)")
    emit(args, payload, "\n".join(lines))
    return 0


def _fact_json(fact) -> dict:
    keys = ("id", "subject", "relation", "prompt", "target", "text", "scope", "user_id", "status", "superseded_by", "created_at")
    return {k: getattr(fact, k) for k in keys}


def cmd_facts(args) -> int:
    store = open_store(args, create=False)
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
    "status": (cmd_status, lambda p: None, "counts of facts, contexts, edits; the recorded model"),
    "contexts": (cmd_contexts, lambda p: p.add_argument("fact_id", type=int), "show a fact's paraphrase contexts"),
    "facts": (cmd_facts, _configure_facts, "list, show, trace or delete facts"),
}
