"""`engram report`: the agent's self-evaluation curves (PNG + HTML) from the store; loads no model."""
from __future__ import annotations

from pathlib import Path

from agent.commands.common import emit, open_store


def _configure_report(p) -> None:
    p.add_argument("--out", default=None, help="output directory (default: <data dir>/report, beside the store)")


def cmd_report(args) -> int:
    from agent.selfeval.report import write_report

    store = open_store(args)  # reads only: safe beside a running agent
    out = Path(args.out) if args.out else store.data_dir / "report"
    result = write_report(store, out)
    last = result["points"][-1]
    shown = ", ".join(f"{k} {v:.3f}" for k, v in last.items() if k not in ("n_edits", "retention_n"))
    emit(args, result, f"{len(result['points'])} self-evaluation point(s); latest at {last['n_edits']} applied "
                       f"facts: {shown}\nwrote {len(result['plots'])} plot(s), selfeval.csv and report.html to {out}")
    return 0


COMMANDS = {
    "report": (cmd_report, _configure_report,
               "draw the agent's periodic self-evaluation curves (PNG per metric + one HTML page) from the store"),
}
