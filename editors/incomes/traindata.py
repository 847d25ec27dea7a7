"""Training data for the gist add-on: facts, their queries, and the paper's chunked pools.

Only train splits are read (DESIGN §5): counterfact-edit.json, knowedit/wiki_counterfact_train_cf.json and
knowedit/wiki_recent_train.json. Held-out checks use a slice of these same files that training never
samples, never the evaluation files. Each fact becomes a sentence (`prompt target.`) for the pool and
its queries: the edit prompt, paraphrases (rephrase prompts, subject aliases), and locality prompts
(unrelated facts the pool must leave alone). The sentence is `prompt target`, exactly as the evaluation
harness writes a learned fact (evaluation/methods.statement); `fact_text` adds a final period to some of
them, so the add-on also sees facts written as sentences (as `engram ingest` gets them).
"""
from __future__ import annotations

import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from memory.errors import ConfigError

log = logging.getLogger(__name__)

TRAIN_FILES = ("counterfact/counterfact-edit.json", "knowedit/wiki_counterfact_train_cf.json",
               "knowedit/wiki_recent_train.json")
CHUNK_SIZES = (8, 16, 32, 64, 128)  # facts per pool, as the paper draws them
CHUNK_PROBS = (0.05, 0.05, 0.05, 0.15, 0.7)


@dataclass(frozen=True)
class Query:
    prompt: str
    answer: str
    kind: str  # "edit" | "paraphrase" | "locality"


@dataclass(frozen=True)
class TrainFact:
    text: str
    edit: Query
    paraphrases: tuple[Query, ...]
    locality: tuple[Query, ...]


def _first_answer(value) -> str | None:
    """A ground truth that may be a string, a list, or a list of alias lists."""
    while isinstance(value, list) and value:
        value = value[0]
    return value.strip() if isinstance(value, str) and value.strip() else None


def _probes(section, kind: str, names: Sequence[str] | None = None) -> list[Query]:
    out = []
    for name, items in (section or {}).items():
        if names is not None and name not in names:
            continue
        for item in items if isinstance(items, list) else []:
            answer = _first_answer(item.get("ground_truth"))
            if isinstance(item.get("prompt"), str) and answer:
                out.append(Query(item["prompt"].strip(), answer, kind))
    return out


def parse_record(rec: dict) -> TrainFact | None:
    """One record of any of the three train formats, or None when it lacks a prompt/target."""
    prompt, target = rec.get("prompt"), _first_answer(rec.get("target_new"))
    if not isinstance(prompt, str) or not prompt.strip() or not target:
        return None
    prompt = prompt.strip()
    paraphrases = []
    if isinstance(rec.get("rephrase_prompt"), str):  # counterfact-edit
        paraphrases.append(Query(rec["rephrase_prompt"].strip(), target, "paraphrase"))
    paraphrases += _probes(rec.get("portability"), "paraphrase", ["Subject_Aliasing"])
    locality = []
    loc_answer = _first_answer(rec.get("locality_ground_truth"))
    if isinstance(rec.get("locality_prompt"), str) and loc_answer:
        locality.append(Query(rec["locality_prompt"].strip(), loc_answer, "locality"))
    if isinstance(rec.get("locality"), dict):
        locality += _probes(rec["locality"], "locality")
    return TrainFact(f"{prompt} {target}", Query(prompt, target, "edit"), tuple(paraphrases), tuple(locality))


def fact_text(fact: TrainFact, rng: random.Random, period_prob: float = 0.0) -> str:
    """The fact's sentence, with a final period with probability `period_prob`."""
    if period_prob and rng.random() < period_prob and not fact.text.endswith("."):
        return fact.text + "."
    return fact.text


def load_train_facts(data_root: str | Path, files: Sequence[str] = TRAIN_FILES) -> list[TrainFact]:
    """Every usable record of the train files present under data_root (missing files are skipped)."""
    root, facts = Path(data_root), []
    for name in files:
        path = root / name
        if "val" in path.name or "test" in path.name:
            raise ConfigError(f"{path} is an evaluation split; train on train splits only")
        if not path.exists():
            log.warning("train file %s not found; skipped", path)
            continue
        records = json.loads(path.read_text())
        parsed = [f for f in (parse_record(r) for r in records if isinstance(r, dict)) if f is not None]
        log.info("%s: %d facts", path.name, len(parsed))
        facts += parsed
    if not facts:
        raise ConfigError(f"no training facts found under {root}")
    return facts


def split_holdout(facts: list[TrainFact], n_holdout: int, seed: int = 0):
    """(train, holdout): a fixed random slice of the train files, kept out of training."""
    order = list(range(len(facts)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_holdout])
    return [f for i, f in enumerate(facts) if i not in held], [facts[i] for i in order[:n_holdout]]


@dataclass(frozen=True)
class Step:
    """One training step: the pool's facts (relevant first) and one query per relevant fact."""

    relevant: list[int]  # indices into the fact list, in the pool and queried
    distractors: list[int]  # indices into the fact list (or the distractor bank), in the pool only
    queries: list[Query]


class ChunkSampler:
    """Deterministic per step (the step number seeds it, and the progress when a curriculum is on), so a
    resumed run sees the same data.

    A pool holds `batch_size` queried facts plus distractors, `chunk` facts in all, where chunk is drawn
    from `chunk_sizes` with `chunk_probs` (raised to batch_size when smaller; with `shrink_batch`, a
    smaller pool is kept and all of its facts are queried instead). With `curriculum` c > 0,
    a step at progress p < c (p in [0, 1] of the run) draws uniformly among the smallest
    `1 + floor(p / c * k)` of the k distinct chunk sizes: pools grow from small to large, then follow
    the paper's probabilities.
    """

    def __init__(self, n_facts: int, batch_size: int, chunk_sizes=CHUNK_SIZES, chunk_probs=CHUNK_PROBS,
                 locality_prob: float = 0.25, paraphrase_prob: float = 0.5, seed: int = 0,
                 curriculum: float = 0.0, shrink_batch: bool = False):
        if len(chunk_sizes) != len(chunk_probs) or abs(sum(chunk_probs) - 1) > 1e-6:
            raise ConfigError("chunk_sizes and chunk_probs must pair up and the probabilities sum to 1")
        if n_facts < max(chunk_sizes) or n_facts < batch_size:
            raise ConfigError(f"{n_facts} facts are too few for chunks of {max(chunk_sizes)}")
        if not 0 <= curriculum <= 1:
            raise ConfigError("curriculum is a fraction of the run, in [0, 1]")
        self.n, self.batch_size, self.seed = n_facts, batch_size, seed
        self.sizes, self.probs = tuple(chunk_sizes), tuple(chunk_probs)
        self.locality_prob, self.paraphrase_prob = locality_prob, paraphrase_prob
        self.curriculum, self.shrink = curriculum, shrink_batch
        self.ladder = sorted({self._effective(s) for s in self.sizes})  # distinct effective sizes

    def _effective(self, size: int) -> int:
        return size if self.shrink else max(size, self.batch_size)

    def chunk_size(self, rng: random.Random, progress: float | None = None) -> int:
        if self.curriculum and progress is not None and progress < self.curriculum:
            allowed = 1 + int(progress / self.curriculum * len(self.ladder))
            return rng.choice(self.ladder[:min(allowed, len(self.ladder))])
        return self._effective(rng.choices(self.sizes, weights=self.probs)[0])

    def step(self, step: int, facts: Sequence[TrainFact], bank: Sequence[int] | None = None,
             progress: float | None = None) -> Step:
        rng = random.Random(self.seed * 1_000_003 + step)
        chunk = self.chunk_size(rng, progress)
        relevant = rng.sample(range(self.n), min(self.batch_size, chunk))
        taken, need = set(relevant), chunk - len(relevant)
        if bank is not None:
            pool_from = [i for i in bank if i not in taken]
            distractors = rng.sample(pool_from, min(need, len(pool_from)))
        else:  # rejection sampling: O(chunk), not O(n_facts) per step
            distractors, target = [], min(need, self.n - len(relevant))
            while len(distractors) < target:
                i = rng.randrange(self.n)
                if i not in taken:
                    taken.add(i)
                    distractors.append(i)
        return Step(relevant, distractors, [self._query(facts[i], rng) for i in relevant])

    def _query(self, fact: TrainFact, rng: random.Random) -> Query:
        if fact.locality and rng.random() < self.locality_prob:
            return rng.choice(fact.locality)
        if fact.paraphrases and rng.random() < self.paraphrase_prob:
            return rng.choice(fact.paraphrases)
        return fact.edit
