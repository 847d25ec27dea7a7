"""What keeps a gradient edit local, beside the box: the settings `constraint`, `update_keys` and
`preserve_lam` of TuneConfig, as a mixin of the shared loop (editors/tuning.py).

- constraint="nullspace": each update D becomes D U U^T, U the directions that general text's keys barely
  use, minus those of the applied edits' keys (editors/nullspace.py); outputs on those keys stay put.
- constraint="covariance": the applied edits' keys are kept exactly, and a subject-keyed update writes
  through C^-1 k, C general text's key moments (ROME's direction: editors/covariance.py).
- update_keys="subject": the update acts only through the key at the subject's last prompt token (its
  free part under "nullspace"): ROME's locus, so prompts about other subjects keep their outputs.
- preserve_lam > 0: the KL to the pre-edit model on prompts written from the fact (editors/preservation.py).
"""
from __future__ import annotations

import logging

import torch

from editors.base import EditRequest

log = logging.getLogger(__name__)


class UpdateConstraints:
    """Mixed into TunedEditor: needs its config, model, tokenizer, device, _param_names and _preserved."""

    @property
    def grows_preserved(self) -> bool:
        """Whether applied edits' keys join the preserved set (the null space, with growing on)."""
        return self.config.constraint != "box" and self.config.grow_preserved

    def preserve(self, requests) -> None:
        """Make the preserved edit keys those of `requests` (the applied weight edits, with fact ids):
        a rolled-back fact's keys leave the set, and edits made before a restart join it."""
        if not self.grows_preserved:
            return
        preserved = self._preserved_set()
        ids = [r.fact_id for r in requests]
        preserved.keep_only(ids)
        for r in requests:
            if r.fact_id not in preserved.edit_keys:
                preserved.add(r.fact_id, self._keys_of(r))

    def preserved_keys(self) -> dict:
        """The applied edits' keys, by fact id in the order they joined (for a resumable checkpoint)."""
        return {} if self._preserved is None else {f: dict(k) for f, k in self._preserved.edit_keys.items()}

    def restore_preserved(self, keys: dict) -> None:
        """Put back keys `preserved_keys` gave: the set then matches the run that saved them exactly."""
        if not self.grows_preserved:
            return
        preserved = self._preserved_set()
        preserved.keep_only(())
        for fact_id, by_name in keys.items():
            preserved.add(fact_id, {n: k.to(self.device) for n, k in by_name.items()})

    def _preserved_set(self):
        """The kept keys: editors.nullspace.Preserved or editors.covariance.KeptKeys (one protocol)."""
        if self._preserved is None:
            from editors.nullspace import Preserved, StatsConfig, load_or_collect, null_basis

            moments = load_or_collect(self.model, self.tokenizer, self._param_names,
                                      StatsConfig(n_texts=self.config.stats_texts))
            if self.config.constraint == "covariance":
                from editors.covariance import KeptKeys, whitener

                self._preserved = KeptKeys({n: int(m.shape[0]) for n, m in moments.items()},
                                           {n: whitener(m, self.config.covariance_ridge).to(self.device)
                                            for n, m in moments.items()})
            else:
                self._preserved = Preserved({n: null_basis(m, self.config.nullspace_energy).to(self.device)
                                             for n, m in moments.items()})
            log.info("%s constraint: free directions per matrix %s", self.config.constraint,
                     self._preserved.free_dims())
        return self._preserved

    def _keys_of(self, request: EditRequest) -> dict[str, torch.Tensor]:
        """The edited matrices' inputs where the model predicts the target's tokens, and at the subject's
        last token (where a subject-keyed edit writes)."""
        from editors.nullspace import edit_keys
        from editors.tuning import encode_fact

        fact = encode_fact(self.tokenizer, request.prompt, request.target, self.device)
        ids = torch.cat([fact.prompt_ids, fact.target_ids[:-1]])
        first = len(fact.prompt_ids) - 1
        positions = list(range(first, first + len(fact.target_ids)))
        at_subject = subject_position(self.tokenizer, request.prompt, request.subject)
        if at_subject is not None and at_subject not in positions:
            positions.insert(0, at_subject)
        keys = edit_keys(self.model, ids, positions, self._param_names)
        return {n: k.to(self.device) for n, k in keys.items()}

    def _subject_directions(self, request: EditRequest, space) -> dict[str, torch.Tensor] | None:
        """Per matrix, the unit input direction of an update keyed on the subject's last token (what the kept
        keys `space` leave of it, when given); None when the prompt does not name the subject."""
        from editors.nullspace import edit_keys

        position = subject_position(self.tokenizer, request.prompt, request.subject)
        if position is None:
            return None
        ids = torch.tensor(self.tokenizer(request.prompt)["input_ids"], device=self.device)
        keys = edit_keys(self.model, ids, [position], self._param_names)
        directions = {}
        for name, key in keys.items():
            key = key.to(self.device)[0]  # [in]
            if space is not None:
                key = space.direction(name, key)
            if float(key.norm()) < 1e-8:
                return None
            directions[name] = (key / key.norm())[:, None]  # [in, 1]
        return directions

    def _preservation(self, request: EditRequest):
        from editors.preservation import prepare, preservation_prompts

        prompts = preservation_prompts(request.prompt, request.subject, self.config.preserve_prompts)
        return prepare(self.model, self.tokenizer, prompts, self.device)

    @staticmethod
    def _project(params: dict, before: dict[str, torch.Tensor], directions: dict[str, torch.Tensor] | None,
                 space) -> None:
        """The edit so far, D = W - W_before, becomes D u u^T (a subject-keyed update: u its unit direction),
        or what `space` lets through of D: it no longer moves outputs on kept keys."""
        from editors.nullspace import project

        with torch.no_grad():
            for name, old in before.items():
                weight = params[name]
                delta = weight - old
                weight.copy_(old + (project(delta, directions[name]) if directions is not None
                                    else space.project_update(name, delta)))


def subject_position(tokenizer, prompt: str, subject: str | None) -> int | None:
    """The index of the prompt token that ends the subject's first mention, or None."""
    subject = (subject or "").strip()
    start = prompt.find(subject) if subject else -1
    if start < 0:
        return None
    end = start + len(subject)
    offsets = tokenizer(prompt, return_offsets_mapping=True)["offset_mapping"]
    inside = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
    return inside[-1] if inside else None
