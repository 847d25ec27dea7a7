"""Router commands (model-free): route explain FACT_ID | counts | policy [--set KEY=VALUE ...]."""
from __future__ import annotations

import json

from agent.commands.common import emit, open_store
from memory.errors import ConfigError, EngramError


def _configure_route(p) -> None:
    p.add_argument("action", choices=["explain", "counts", "policy"],
                   help="explain: a fact's routing decision and outcome; counts: applied and verified facts per "
                        "route; policy: show (or --set) the store's routing policy")
    p.add_argument("fact_id", nargs="?", type=int, help="the fact to explain")
    p.add_argument("--set", dest="changes", action="append", default=[], metavar="KEY=VALUE",
                   help="with `policy`: change one setting (a JSON value, or a bare word), e.g. default_route=ice")


def _inputs_line(inputs: dict) -> str:
    return ", ".join(f"{k}={json.dumps(v) if isinstance(v, (dict, list)) else v}" for k, v in inputs.items())


def _explain_text(payload: dict) -> str:
    lines = [f"fact {payload['fact_id']} ({payload['status']}, {payload['scope']}): {payload['statement']}"]
    if not payload["routed"]:
        return "\n".join(lines + [payload["message"]])
    d, out = payload["decision"], payload["outcome"]
    policy = ", ".join(f"{k}={v}" for k, v in d["policy"].items())
    lines += [f"route    {d['route']}", f"reason   {d['reason']}", f"inputs   {_inputs_line(d['inputs'])}",
              f"policy   {policy}"]
    if len(payload["decisions"]) > 1:
        lines.append("earlier decisions")
        lines += [f"  {x['route']:<5} {x['reason']}" for x in payload["decisions"][:-1]]
    lines.append("verifications" if payload["verifications"] else "verifications  none recorded")
    for v in payload["verifications"]:
        verdict = {True: "learned", False: "NOT learned", None: "not checked"}[v["ok"]]
        lines.append(f"  {v['route']:<5} {verdict:<12} answered {v['answer']!r} (target {v['target']!r})")
    verified = {True: "verified", False: "not learned", None: "not verified"}[out["verified"]]
    retried = " (after a retry)" if out["retried"] else ""
    lines.append(f"outcome  {out['route']}: {out['state']}, {verified}{retried}")
    lines.append(f"         {out['summary']}")
    return "\n".join(lines)


def _parse_changes(changes: list[str]) -> dict:
    parsed = {}
    for change in changes:
        key, sep, raw = change.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set needs KEY=VALUE, got {change!r}")
        try:
            parsed[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            parsed[key.strip()] = raw  # a bare word: ice, gist
    return parsed


def cmd_route(args) -> int:
    from agent.router import explain, policy_from_store, route_counts, save_policy

    if args.action != "policy" and args.changes:
        raise EngramError("--set only applies to `engram route policy`")
    store = open_store(args, create=False)
    if args.action == "explain":
        if args.fact_id is None:
            raise EngramError("`engram route explain` needs a FACT_ID")
        payload = explain(store, args.fact_id)
        emit(args, payload, _explain_text(payload))
    elif args.action == "counts":
        counts = route_counts(store)
        emit(args, counts, "\n".join(f"{route:<5} " + ", ".join(f"{k} {v}" for k, v in c.items())
                                     for route, c in counts.items()))
    else:
        policy = policy_from_store(store)
        if args.changes:
            policy = policy.with_changes(**_parse_changes(args.changes))  # validated before it is saved
            save_policy(store, policy)
        emit(args, policy.to_dict(), "\n".join(f"{k:<22}{v}" for k, v in policy.to_dict().items()))
    return 0


COMMANDS = {
    "route": (cmd_route, _configure_route, "explain a fact's route (ice or gist), route counts, the routing policy"),
}
