"""Metrics on hand-made logits, strings, a fake fixed-logits model and a tiny Llama, with known answers."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from evaluation import metrics as M


class WordTokenizer:
    """Whitespace words -> ids 2.. (BOS = 1, pad = 0): token boundaries are obvious in the tests."""

    pad_token_id = 0
    eos_token_id = 0

    def __init__(self, words: str = "a b c d e f g h"):
        self.vocab = {w: i + 2 for i, w in enumerate(words.split())}

    def __call__(self, text: str) -> dict:
        return {"input_ids": [1] + [self.vocab[w] for w in text.split()]}


class TableModel(torch.nn.Module):
    """A fake LM: the logits at a position depend only on the token there, via a [V, V] table of log-probs."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table, requires_grad=False)
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, input_ids, attention_mask=None):
        self.calls.append((input_ids.clone(), attention_mask.clone()))
        return SimpleNamespace(logits=self.table[input_ids])  # [B, T, V]


def next_token_model(vocab: int = 12) -> TableModel:
    """Always predicts id + 1 (so 'a b c d' is a perfectly predicted sequence)."""
    table = torch.full((vocab, vocab), -10.0)
    for i in range(vocab):
        table[i, (i + 1) % vocab] = 0.0
    return TableModel(table)


# ---------------------------------------------------------------------------------------------- pure maths

def test_span_argmax_reads_the_row_before_each_token():
    logits = torch.zeros(5, 7)
    for t, tok in enumerate([3, 1, 4, 6, 2]):
        logits[t, tok] = 1.0  # row t predicts token t+1
    assert M.span_argmax(logits, 2, 5).tolist() == [1, 4, 6]  # tokens 2..4 come from rows 1..3
    with pytest.raises(ValueError):
        M.span_argmax(logits, 0, 3)  # token 0 has no prediction


def test_token_accuracy_and_locality():
    assert M.token_accuracy([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    assert M.locality(pre_argmax=[5, 6, 7, 8], post_argmax=[5, 0, 7, 0]) == 0.5
    assert M.locality([9], [9]) == 1.0
    assert M.locality([1, 2], [1]) == 0.5  # a re-tokenised answer: the unmatched token counts as changed
    with pytest.raises(ValueError):
        M.locality([], [])
    with pytest.raises(ValueError):
        M.token_accuracy([], [])


def test_span_nll_is_shifted():
    log_probs = torch.log(torch.tensor([[0.25, 0.75], [0.5, 0.5], [0.9, 0.1]]))  # rows 0..2
    ids = [0, 1, 0]
    assert M.span_nll(log_probs, ids, 1, 3) == pytest.approx(-(math.log(0.75) + math.log(0.5)) / 2)
    assert M.span_nll(log_probs + 3.0, ids, 2, 3) == pytest.approx(-math.log(0.5))  # softmax ignores a shift


def test_mean_or_none():
    assert M.mean_or_none([]) is None and M.mean_or_none([0.0, 1.0]) == 0.5


# ---------------------------------------------------------------------------------------------- teacher forcing

def test_teacher_forced_accuracy_known_answers_and_right_padding():
    model, tok = next_token_model(), WordTokenizer()
    scores = M.teacher_forced_accuracy(model, tok, ["a b", "a b", "a"], ["c d", "c f", "b"], batch_size=4)
    assert scores == [1.0, 0.5, 1.0]
    ids, mask = model.calls[0]
    assert ids.tolist()[2] == [1, 2, 3, 0, 0] and mask.tolist()[2] == [1, 1, 1, 0, 0]  # padded on the right


def test_argmax_tokens_returns_the_models_predictions():
    model, tok = next_token_model(), WordTokenizer()
    assert M.argmax_tokens(model, tok, ["a b", "c"], ["g h", "a"]) == [[4, 9], [5]]
    # the same probe before and after an "edit" that changes nothing: locality 1
    pre = M.argmax_tokens(model, tok, ["a b"], ["g h"])[0]
    assert M.locality(pre, M.argmax_tokens(model, tok, ["a b"], ["g h"])[0]) == 1.0


def test_teacher_forced_rejects_bad_input():
    model, tok = next_token_model(), WordTokenizer()
    with pytest.raises(ValueError, match="empty target"):
        M.teacher_forced_accuracy(model, tok, ["a"], [" "])
    with pytest.raises(ValueError):
        M.teacher_forced_accuracy(model, tok, ["a", "b"], ["c"])


def test_join_prompt_target_spacing():
    assert M.join_prompt_target("The capital is", "Paris") == "The capital is Paris"
    assert M.join_prompt_target("Q: capital?\n", "Paris") == "Q: capital?\nParis"
    assert M.join_prompt_target("The capital is", " Paris") == "The capital is Paris"


@pytest.fixture(scope="module")
def tiny():
    from editors.model import tiny_llama, tiny_tokenizer

    return tiny_llama(), tiny_tokenizer()


CASES = [("The capital of Fr", "Paris"), ("x", "a much longer target string"), ("Hello there, how are", "you"),
         ("Mid length prompt here", "ok then")]


def test_tiny_llama_matches_the_definition(tiny):
    """Batched scores equal the definition: argmax of the model fed prompt + target[:i], one token at a time."""
    model, tok = tiny
    got = M.teacher_forced_accuracy(model, tok, [p for p, _ in CASES], [t for _, t in CASES], batch_size=3)
    for (prompt, target), score in zip(CASES, got):
        ids, start = M.encode_target(tok, prompt, target)
        hits = []
        for i in range(start, len(ids)):
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids[:i]])).logits[0, -1]
            hits.append(int(logits.argmax()) == ids[i])
        assert score == pytest.approx(sum(hits) / len(hits))


def test_padding_does_not_change_results(tiny):
    model, tok = tiny
    prompts, targets = [p for p, _ in CASES], [t for _, t in CASES]
    alone = [M.argmax_tokens(model, tok, [p], [t], batch_size=1)[0] for p, t in CASES]
    assert M.argmax_tokens(model, tok, prompts, targets, batch_size=4) == alone
    assert M.argmax_tokens(model, tok, prompts, targets, batch_size=2) == alone
    single = [M.teacher_forced_accuracy(model, tok, [p], [t], batch_size=1)[0] for p, t in CASES]
    assert M.teacher_forced_accuracy(model, tok, prompts, targets, batch_size=4) == single


def test_target_span_with_the_real_tokenizer():
    """The target is tokenised as the prompt's continuation: ' Paris' with its leading space."""
    from editors.model import cache_root

    path = cache_root() / "models" / "smollm2-135m"
    if not (path / "tokenizer.json").exists():
        pytest.skip(f"the SmolLM2 tokenizer cache is absent at {path} (built by the first load_model)")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    ids, start = M.encode_target(tok, "The capital of France is", "Paris")
    assert tok.decode(ids[start:]) == " Paris"
    assert tok.decode(ids[:start]) == "The capital of France is"
    assert M.encode_target(tok, "The capital of France is ", "Paris") == (ids, start)  # no doubled space


# ---------------------------------------------------------------------------------------------- pplr

def test_pplr_known_value():
    """Prompt+target tokens each get p=0.5 (mean NLL log 2), continuation tokens p=0.25 (log 4): PPL_r = 4/2."""
    vocab = 12
    table = torch.full((vocab, vocab), 1e-6)
    for src, p in {1: 0.5, 2: 0.5, 3: 0.5, 4: 0.25, 5: 0.25}.items():
        table[src] = (1 - p) / (vocab - 1)
        table[src, src + 1] = p  # the next word in 'a b c d e' follows the current one
    model = TableModel(table.log())
    # ids: [BOS=1, a=2, b=3, c=4, d=5, e=6]; 'a b' + 'c' is scored by rows 0..2, ' d e' by rows 3..4
    assert M.pplr(model, WordTokenizer(), "a b", "c", " d e") == pytest.approx(2.0, rel=1e-4)


def test_pplr_of_a_uniform_model_is_one():
    model = TableModel(torch.zeros(12, 12))
    assert M.pplr(model, WordTokenizer(), "a", "b", " c d e") == pytest.approx(1.0)
    with pytest.raises(ValueError):
        M.pplr(model, WordTokenizer(), "a", "b", "")


# ---------------------------------------------------------------------------------------------- generation

def test_normalize_answer():
    assert M.normalize_answer("  The  Eiffel-Tower, in PARIS! ") == "eiffeltower in paris"
    assert M.normalize_answer("An apple a day") == "apple day"


def test_exact_match_at_start():
    assert M.exact_match_at_start("Paris, the capital of France.", "Paris")
    assert M.exact_match_at_start("the United States of America", ["USA", "United States"])
    assert not M.exact_match_at_start("Parisian cafés", "Paris")  # word boundary
    assert not M.exact_match_at_start("I think it is Paris", "Paris")  # at the start only
    assert not M.exact_match_at_start("The", ["the"])  # an answer that normalises to nothing never matches
    assert M.exact_match_at_start("Lyon", ["Paris", "lyon"])


def test_multihop_accuracy():
    answers = [["Arabic", "Arabic language"], ["Peru"], ["Oslo"]]
    assert M.multihop_accuracy(["Arabic language.", "Chile", "oslo is"], answers) == pytest.approx(2 / 3)
    # one output per paraphrased question: a case counts when any is right
    assert M.multihop_accuracy([["no", "Arabic"], ["Chile", "Bolivia"], ["Oslo"]], answers) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        M.multihop_accuracy(["x"], answers)


# ---------------------------------------------------------------------------------------------- fluency

def test_ngram_entropy():
    assert M.ngram_entropy("a b a b", 2) == pytest.approx(-(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3)))
    assert M.ngram_entropy("a b c d", 3) == pytest.approx(1.0)  # two distinct trigrams
    assert M.ngram_entropy("word", 2) == 0.0


def test_fluency_weights_and_repetition():
    text = "the cat sat on a mat"  # 5 distinct bigrams, 4 distinct trigrams
    assert M.fluency(text) == pytest.approx(2 / 3 * math.log2(5) + 4 / 3 * 2.0)
    assert M.fluency("the the the the the the") == 0.0
    assert M.fluency("Paris. Paris. Paris. Paris.") < M.fluency("Paris is a city in France, on the Seine.")
