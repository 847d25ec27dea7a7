"""Fit the relation gate's learned same-relation test on the train files only (editors/incomes/relation_classifier).

Pairs as in scripts/relation_gate_calibration.py (a fact's relation text against a query about the same
subject, same relation or not), plus counterfact-edit's noisy paraphrases as same-relation pairs. A fifth of
the facts' relation texts is held out: no pair with a held-out text on either side is fitted on, and the
thresholds come from the held-out pairs, the highest that keep 95% of same-relation pairs (facts written as a
question), and of counterfact-edit's paraphrases and the other same-relation pairs (statement facts).

    python scripts/train_relation_gate.py [--data-root ../shared/data] [--out editors/incomes/addons/relation-gate]
"""
from __future__ import annotations

import argparse
import random
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from relation_gate_calibration import pairs, paraphrase_pairs  # noqa: E402

from editors.incomes.relation_classifier import DEFAULT_DIR, RelationClassifier, pair_features  # noqa: E402
from editors.incomes.relation_gate import DEFAULT_QUESTION_THRESHOLD, DEFAULT_THRESHOLD, is_question  # noqa: E402
from editors.incomes.traindata import TRAIN_FILES, load_train_facts  # noqa: E402
from memory.embeddings import default_embedder  # noqa: E402

KEEP = 0.95


def labelled_pairs(data_root: str, n_facts: int, rng: random.Random) -> list[tuple[str, str, int, bool]]:
    """(fact relation text, query sentence, 1 if the same relation, from counterfact-edit's paraphrases)."""
    facts = [f for f in load_train_facts(data_root) if f.subject]
    rng.shuffle(facts)
    same, other = pairs(facts[:n_facts], rng)
    counterfact = [f for f in load_train_facts(data_root, TRAIN_FILES[:1]) if f.subject]
    noisy = paraphrase_pairs(counterfact)
    return ([(a, b, 1, False) for a, b in same] + [(a, b, 0, False) for a, b in other]
            + [(a, b, 1, True) for a, b in noisy])


def fit(features: np.ndarray, labels: np.ndarray, weight_decay: float) -> tuple[np.ndarray, float]:
    """L2-regularised logistic regression by L-BFGS (full batch: a few tens of thousands of pairs)."""
    x, y = torch.from_numpy(features), torch.from_numpy(labels.astype(np.float32))
    linear = torch.nn.Linear(x.shape[1], 1)
    opt = torch.optim.LBFGS(linear.parameters(), max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(linear(x)[:, 0], y)
        loss = loss + weight_decay * (linear.weight ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return linear.weight.detach().numpy()[0].copy(), float(linear.bias.detach()[0])


def rates(scores: np.ndarray, labels: np.ndarray, threshold: float) -> tuple[float, float]:
    """(share of same-relation pairs kept, share of other-relation pairs blocked) at `threshold`."""
    return float((scores[labels == 1] >= threshold).mean()), float((scores[labels == 0] < threshold).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default="../shared/data")
    ap.add_argument("--facts", type=int, default=6000, help="train facts with a subject, drawn at random")
    ap.add_argument("--weight-decay", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(DEFAULT_DIR))
    args = ap.parse_args()
    rng = random.Random(args.seed)
    data = labelled_pairs(args.data_root, args.facts, rng)
    keys = sorted({a for a, *_ in data})
    random.Random(args.seed + 1).shuffle(keys)
    held = set(keys[:len(keys) // 5])
    test = [p for p in data if p[0] in held]
    train = [p for p in data if p[0] not in held and p[1] not in held]
    embedder = default_embedder()
    texts = sorted({t for a, b, *_ in data for t in (a, b)})
    vectors = dict(zip(texts, embedder.embed(texts)))

    def arrays(rows):
        a = np.stack([vectors[r[0]] for r in rows])
        b = np.stack([vectors[r[1]] for r in rows])
        feats = pair_features(a, b, [is_question(r[0]) for r in rows], [is_question(r[1]) for r in rows])
        return feats, np.array([r[2] for r in rows]), (a * b).sum(axis=1)

    x_train, y_train, _ = arrays(train)
    weight, bias = fit(x_train, y_train, args.weight_decay)
    x_test, y_test, cosine = arrays(test)
    logits = x_test @ weight + bias
    asks = np.array([is_question(r[0]) for r in test])
    noisy = np.array([r[3] for r in test])
    positive = y_test == 1
    question_threshold = float(np.quantile(logits[asks & positive], 1 - KEEP))
    threshold = float(min(np.quantile(logits[~asks & positive & noisy], 1 - KEEP),
                          np.quantile(logits[~asks & positive & ~noisy], 1 - KEEP)))
    report = {"train_pairs": len(train), "heldout_pairs": len(test), "heldout_relation_texts": len(held),
              "relation_texts": len(keys)}
    print(f"{len(train)} pairs fitted, {len(test)} held out ({len(held)} of {len(keys)} relation texts)")
    for name, mask, learned_t, cosine_t in (("question facts", asks, question_threshold, DEFAULT_QUESTION_THRESHOLD),
                                            ("statement facts", ~asks, threshold, DEFAULT_THRESHOLD)):
        kept, blocked = rates(logits[mask], y_test[mask], learned_t)
        c_kept, c_blocked = rates(cosine[mask], y_test[mask], cosine_t)
        report[name] = {"learned_keeps": kept, "learned_blocks": blocked, "cosine_keeps": c_kept,
                        "cosine_blocks": c_blocked, "same": int((y_test[mask] == 1).sum()),
                        "other": int((y_test[mask] == 0).sum())}
        print(f"{name}: learned (logit >= {learned_t:.2f}) keeps {kept:.3f}, blocks {blocked:.3f}; "
              f"cosine (>= {cosine_t}) keeps {c_kept:.3f}, blocks {c_blocked:.3f}")
    cf_kept = float((logits[~asks & positive & noisy] >= threshold).mean())
    print(f"held-out counterfact-edit paraphrases kept: {cf_kept:.3f}")
    report["counterfact_paraphrases_kept"] = cf_kept
    report["command"] = " ".join(["python scripts/train_relation_gate.py", shlex.join(sys.argv[1:])]).strip()
    classifier = RelationClassifier(weight, bias, threshold, question_threshold, embedder.name, report)
    print("saved", classifier.save(args.out))


if __name__ == "__main__":
    main()
