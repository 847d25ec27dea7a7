"""Run `engram run` on a pseudo-terminal and keep its live view's frames as text (for the README).

The live view is drawn only on a terminal, so the command runs under a pty of a fixed size; its output is
split into the frames rich redrew (each starts with the "engram run" title), with the escape sequences
taken out. Writes the last frame, with the log lines and the closing summary under it, to `--out`.

    python scripts/capture_live_view.py --out docs/agent-live-view.txt -- \\
        engram run --db sqlite:///runs/capture/store.sqlite --source runs/capture/stream.jsonl --until-idle --eval-every 20
"""
from __future__ import annotations

import argparse
import os
import pty
import re
import struct
import subprocess
import sys
from pathlib import Path

ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")
TITLE = "engram run\n"


def capture(cmd: list[str], columns: int, rows: int) -> str:
    import fcntl
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    env = {**os.environ, "COLUMNS": str(columns), "LINES": str(rows), "TERM": "xterm-256color"}
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=follower, stderr=follower, env=env)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    proc.wait()
    return b"".join(chunks).decode("utf-8", "replace")


def frames(raw: str) -> list[str]:
    text = ESCAPES.sub("", raw)
    parts = text.split(TITLE)
    return [TITLE + part.rstrip() for part in parts[1:]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--columns", type=int, default=110)
    ap.add_argument("--rows", type=int, default=40)
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        sys.exit("give the command after --")
    shots = frames(capture(cmd, args.columns, args.rows))
    if not shots:
        sys.exit("no live view was drawn (is rich installed?)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(shots[-1] + "\n")
    print(f"{len(shots)} frames; the last written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
