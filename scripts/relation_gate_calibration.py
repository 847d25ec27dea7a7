"""Choose the relation gate's threshold on the train files only (editors/incomes/relation_gate).

Pairs, each a fact's prompt (or one of its question forms) against a query about the same subject:
- same relation (should read): the fact's paraphrase prompts that name the subject, its other question
  forms (editors/incomes/questions), and its template prompt against its question form;
- other relation (should not): the train files' locality probes that name the subject, and one relation of
  the 27 that the files' same-subject probes ask, in KnowEdit's two forms ("The R of X is", "X R").
Prints, per threshold, the share of same-relation pairs kept and of other-relation pairs blocked, for all
facts and for the facts written as a question (which have their own threshold).

    python scripts/relation_gate_calibration.py [--data-root ../shared/data] [--facts 1500]
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from editors.incomes.questions import relation_questions  # noqa: E402
from editors.incomes.relation_gate import is_question, relation_text  # noqa: E402
from editors.incomes.traindata import TRAIN_FILES, _relation_probes, load_train_facts  # noqa: E402
from memory.embeddings import default_embedder  # noqa: E402


def pairs(facts, rng: random.Random) -> tuple[list, list]:
    relations = sorted(_relation_probes(facts))
    same, other = [], []
    for fact in facts:
        s, prompt = fact.subject, fact.edit.prompt
        questions = list(relation_questions(prompt, s))
        for asked in [prompt] + questions[:1]:
            key = relation_text(asked, s)
            alike = [p.prompt for p in fact.paraphrases if s in p.prompt] + [q for q in questions if q != asked]
            same += [(key, relation_text(q, s)) for q in alike + ([prompt] if asked != prompt else [])]
            other += [(key, relation_text(q.prompt, s)) for q in fact.locality if s in q.prompt]
            r = rng.choice(relations)
            if not any(w in (prompt + " ".join(questions)).lower() for w in r.split() if len(w) > 3):
                other += [(key, f"The {r} of X is"), (key, f"X {r}")]
    return same, other


def paraphrase_pairs(facts) -> list:
    """Each fact's relation text against each of its paraphrase prompts that names the subject (counterfact-edit's
    are noisy: "Category:Nigerian traditional states X works as")."""
    return [(relation_text(f.edit.prompt, f.subject), relation_text(p.prompt, f.subject))
            for f in facts for p in f.paraphrases if f.subject.lower() in p.prompt.lower()]


def cosines(embedder, pairs_: list) -> np.ndarray:
    a = embedder.embed([p[0] for p in pairs_])
    b = embedder.embed([p[1] for p in pairs_])
    return (a * b).sum(axis=1)  # unit vectors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default="../shared/data")
    ap.add_argument("--facts", type=int, default=1500, help="train facts with a subject, drawn at random")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    facts = [f for f in load_train_facts(args.data_root) if f.subject]
    rng.shuffle(facts)
    same, other = pairs(facts[:args.facts], rng)
    counterfact = [f for f in load_train_facts(args.data_root, TRAIN_FILES[:1]) if f.subject]
    rng.shuffle(counterfact)
    noisy = paraphrase_pairs(counterfact[:1000])
    embedder = default_embedder()
    keep, block, cf = cosines(embedder, same), cosines(embedder, other), cosines(embedder, noisy)
    auc = float((keep[:, None] > block[None, :]).mean())
    print(f"{len(same)} same-relation pairs, {len(other)} other-relation pairs; AUC {auc:.3f}; "
          f"{len(noisy)} counterfact-edit paraphrase pairs")
    for threshold in (0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6):
        print(f"threshold {threshold:.2f}: keeps {(keep >= threshold).mean():.3f} of same-relation pairs "
              f"({(cf >= threshold).mean():.3f} of counterfact-edit's paraphrases), "
              f"blocks {(block < threshold).mean():.3f} of other-relation pairs")
    # facts written as a question (the gate's question_threshold): the pairs whose fact side is a question
    asks_same = np.array([is_question(p[0]) for p in same])
    asks_other = np.array([is_question(p[0]) for p in other])
    print(f"facts written as a question: {asks_same.sum()} same-relation, {asks_other.sum()} other-relation pairs")
    for threshold in (0.4, 0.45, 0.5, 0.55, 0.6):
        print(f"threshold {threshold:.2f}: keeps {(keep[asks_same] >= threshold).mean():.3f}, "
              f"blocks {(block[asks_other] < threshold).mean():.3f}")


if __name__ == "__main__":
    main()
