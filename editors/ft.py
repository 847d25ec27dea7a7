"""FT-M: fine-tune the same MLP projections as ICE on the target tokens only (no sampling, no context).

The strongest baseline in the ICE and InComeS papers. Same layers, lr, steps, box and early stopping as
ICE (editors/tuning.py); the loss is the cross entropy of the target given the bare prompt.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from editors.tuning import EncodedFact, StepOut, TuneConfig, TunedEditor, target_terms


@dataclass(frozen=True)
class FTConfig(TuneConfig):
    """FT-M settings: only the shared ones (see TuneConfig)."""


class FTEditor(TunedEditor):
    name: ClassVar[str] = "ftm"
    config_class: ClassVar[type] = FTConfig

    def _objective(self, job: EncodedFact, step: int, generator: torch.Generator) -> StepOut:
        n_target = len(job.target_ids)
        ids = torch.cat([job.prompt_ids, job.target_ids[:-1]])[None]  # [1, Lq+Lx-1]
        logits = self.model(input_ids=ids, use_cache=False, logits_to_keep=n_target).logits[0]  # [Lx, V]
        nll, nll_mean, learned = target_terms(logits, job.target_ids)
        return StepOut(loss=nll, nll=nll_mean, learned=learned)
