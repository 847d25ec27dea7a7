"""The apply half of the agent loop (AgentLoop's base): weight edits one by one, the gist facts as one
compression batch, and, with a verifier, each applied fact's check at once (agent/loop/verify.py), so a
weight edit is checked before the next one lands on top of it and a failed one rolls back alone.

A fact its route did not learn comes back from the check as a retry (stage `routed` on the other route)
and goes round once more; the router allows one retry a fact, so the rounds end.
"""
from __future__ import annotations

from agent.consolidate import ConsolidationResult
from agent.loop import stages as steps
from memory.stages import ROUTED, VERIFYING, LeaseLostError, Outcome, settle

GIST = "gist"


class Applying:
    """Needs the loop's store, config, backends, view, stop, totals, verify (Verifying), _gist, _track,
    _renew(), _report() and _open_gist()."""

    _consolidator = None  # made on the first idle round with consolidation on
    _consolidated = None  # its ConsolidationResult, over this process's life

    def _apply(self, ready) -> None:
        while ready and not self.stop.requested:  # a retry goes round once more, on its other route
            ready = self._apply_once(ready)

    def _apply_once(self, ready) -> list:
        weights = [(f, r) for f, r in ready if r.route != GIST]
        gist = [(f, r) for f, r in ready if r.route == GIST]
        retries = []
        for fact, routed in weights:
            if self.stop.requested:
                return []
            self._renew()
            if self.backends.editor is None:
                steps.fail_edits(self.store, [routed.edit_id], "no weight editor is configured")
            else:
                steps.apply_weights(self.backends.state, self.backends.editor, fact, routed)
            retries += self._check_settled([fact], self._settle([fact.id]))  # before the next edit lands
        if gist and not self.stop.requested:
            ids, edits = [f.id for f, _ in gist], [r.edit_id for _, r in gist]
            self._renew()
            pool = self._open_gist()
            if pool is None:
                steps.fail_edits(self.store, edits, self._gist_error or "no gist pool is configured")
            else:
                steps.apply_gist(pool, [f for f, _ in gist], edits)
            retries += self._check_settled([f for f, _ in gist], self._settle(ids))
        return retries

    def _settle(self, fact_ids=None) -> list[Outcome]:
        return settle(self.store, self.config.max_attempts, fact_ids, verify=self.verify.enabled)

    def _check_settled(self, facts, outcomes) -> list:
        self._report(outcomes)
        owed = {o.fact_id for o in outcomes if o.stage == VERIFYING}
        return self._check([f for f in facts if f.id in owed])

    def _check(self, facts) -> list:
        """The verify step of each fact (applied, its check owed): the retries it queued, as (fact, Routed)."""
        retries = []
        for fact in facts:
            if self.stop.requested:
                break
            self._renew()
            try:
                checked = self.verify.check(fact, self._gist)
            except LeaseLostError as exc:
                self.view.note(str(exc))
                continue
            self._notes(checked.notes)
            if checked.retry is None:
                self._report([checked.outcome])
                continue
            self.totals.retried += 1
            track = self._track.get(fact.id)
            if track is not None:
                track.trail.append(ROUTED)
                track.reason = checked.retry.reason
            retries.append((fact, checked.retry))
        return retries

    def _consolidate_idle(self) -> bool:
        """With consolidate_when_idle, one fact from the pool into the weights per idle round (so a new
        source line waits for one edit at most); whether one was tried."""
        make = self.backends.consolidator
        if not self.config.consolidate_when_idle or make is None or self.stop.requested:
            return False
        gist = self._open_gist()
        if gist is None:
            return False
        if self._consolidator is None:
            self._consolidator, self._consolidated = make(gist), ConsolidationResult()
            self._consolidator.reconcile(self._consolidated)  # what a kill left half done
        todo = self._consolidator.candidates(limit=1)
        if not todo:
            return False
        self._consolidator.step(todo[0], self._consolidated)
        moved = todo[0] in self._consolidated.consolidated
        self.view.note(f"fact {todo[0]}: " + ("consolidated into the weights (its gist left the pool)" if moved
                       else self._consolidated.errors.get(todo[0], "ICE did not learn it; its gist stays")))
        return True

    def _notes(self, texts) -> None:
        for text in texts:
            self.view.note(text)

    def _self_evaluate(self, applied: int) -> None:
        """A point every N applied facts (agent/selfeval); a failed measurement never stops the agent."""
        reading = self._gist.memory.reading() if self._gist is not None else None
        try:
            point = self.backends.selfeval.maybe_run(applied, reading=reading)
        except Exception as exc:  # noqa: BLE001 - the agent goes on; the note says what broke
            self.view.note(f"self-evaluation failed: {type(exc).__name__}: {exc}")
            return
        if point is not None:
            self.view.note(f"self-evaluation at {point['n_edits']} applied facts: " + ", ".join(
                f"{k} {v:.3f}" for k, v in point.items() if k not in ("n_edits", "retention_n")))
