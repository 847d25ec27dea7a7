"""`GET /metrics`: Prometheus text under the `engram:` prefix, modelled on vLLM's names.

Requests, tokens and latency histograms are counted as answers finish; the store's side (edits by route,
edit seconds, the agent's queue by stage) and the pool's size are read at each scrape, so they are right
whichever process made the edits.
"""
from __future__ import annotations

import bisect
import logging
import threading
from collections import Counter

from agent.chat import ROUTES

log = logging.getLogger(__name__)

# seconds; vLLM's first buckets, cut for a CPU model
BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)


class Histogram:
    def __init__(self, name: str, help_text: str):
        self.name, self.help = name, help_text
        self.counts, self.total, self.n = [0] * len(BUCKETS), 0.0, 0

    def observe(self, seconds: float) -> None:
        slot = bisect.bisect_left(BUCKETS, seconds)  # past the last bucket: only +Inf counts it
        if slot < len(BUCKETS):
            self.counts[slot] += 1
        self.total += seconds
        self.n += 1

    def lines(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        running = 0
        for bound, count in zip(BUCKETS, self.counts):
            running += count
            out.append(f'{self.name}_bucket{{le="{bound}"}} {running}')
        return out + [f'{self.name}_bucket{{le="+Inf"}} {self.n}', f"{self.name}_sum {self.total:.6f}",
                      f"{self.name}_count {self.n}"]


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests: Counter = Counter()  # (route, status)
        self.prompt_tokens = self.generation_tokens = 0
        self.ttft = Histogram("engram:time_to_first_token_seconds", "request to first streamed token")
        self.e2e = Histogram("engram:e2e_request_latency_seconds", "request to last token")

    def count(self, route: str, status: int, prompt: int = 0, generated: int = 0, ttft_s: float | None = None,
              e2e_s: float | None = None) -> None:
        route = route if route in ROUTES else "unknown"  # a label from the client's text must stay bounded
        with self.lock:
            self.requests[(route, status)] += 1
            self.prompt_tokens += prompt
            self.generation_tokens += generated
            if ttft_s is not None:
                self.ttft.observe(ttft_s)
            if e2e_s is not None:
                self.e2e.observe(e2e_s)

    def text(self, engine) -> str:
        with self.lock:
            lines = ["# TYPE engram:request_success_total counter"]
            lines += [f'engram:request_success_total{{route="{r}",status="{s}"}} {n}'
                      for (r, s), n in sorted(self.requests.items())]
            lines += ["# TYPE engram:prompt_tokens_total counter", f"engram:prompt_tokens_total {self.prompt_tokens}",
                      "# TYPE engram:generation_tokens_total counter",
                      f"engram:generation_tokens_total {self.generation_tokens}"]
            lines += self.ttft.lines() + self.e2e.lines()
        if engine is not None:
            lines += ["# TYPE engram:model_version gauge", f"engram:model_version {engine.model_version}"]
            lines += _pool_lines(engine) + _store_lines(engine.store)
        return "\n".join(lines) + "\n"


def _pool_lines(engine) -> list[str]:
    gist = engine.gist
    pool = gist.memory.pool if gist is not None else None
    size, size_bytes = (len(pool), pool.nbytes()) if pool is not None else (0, 0)
    return ["# TYPE engram:gist_pool_facts gauge", f"engram:gist_pool_facts {size}",
            "# TYPE engram:gist_pool_bytes gauge", f"engram:gist_pool_bytes {size_bytes}"]


def _store_lines(store) -> list[str]:
    if store is None:
        return []
    from sqlalchemy import func, select

    from memory.models import Edit
    from memory.stages import stage_counts

    try:
        with store.transaction() as s:
            edits = s.execute(select(Edit.backend, Edit.status, func.count(), func.sum(Edit.seconds))
                              .group_by(Edit.backend, Edit.status)).all()
        queue = stage_counts(store)["stages"]
    except Exception as exc:  # noqa: BLE001 - a busy store must not cost the scrape
        log.warning("metrics: the store could not be read: %s", exc)
        return []
    lines = ["# TYPE engram:edits_total counter"]
    lines += [f'engram:edits_total{{backend="{b}",status="{st}"}} {n}' for b, st, n, _ in sorted(edits)]
    lines += ["# TYPE engram:edit_seconds_total counter"]
    lines += [f'engram:edit_seconds_total{{backend="{b}"}} {sum(t or 0.0 for bb, _, _, t in edits if bb == b):.3f}'
              for b in sorted({b for b, *_ in edits})]
    lines += ["# TYPE engram:queue_facts gauge"]
    return lines + [f'engram:queue_facts{{stage="{stage}"}} {n}' for stage, n in queue.items()]
