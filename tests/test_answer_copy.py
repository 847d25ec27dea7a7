"""The answer copy: a begun answer of a fact the gates let a query read is finished from its stored tokens."""
from __future__ import annotations

import pytest
import torch

from editors.incomes import GistPool
from editors.incomes.answer_copy import ANSWER_END, answer_forms, apply_copy, copy_targets
from editors.incomes.hooks import id_string
from editors.incomes.memory import GistMemory
from tests.test_gist_gate import logits as gate_logits
from tests.test_gist_gate import memory as gated_memory


def s(*ids: int) -> str:
    return id_string(ids)


def test_the_longest_begun_answer_claims_a_position_and_only_this_forwards_positions_count():
    answers = [[s(1, 2, 3)], [s(2, 9)]]
    # the sequence so far is 7 1 | 2 5 1 2 (this forward starts at index 2)
    found = copy_targets([s(7, 1, 2, 5, 1, 2)], [2], answers, [[0, 1]])
    # index 2 (token 2 after 1): row 0's prefix (1, 2) beats row 1's (2,); index 4 (token 1): row 0 -> 2;
    # index 5 (token 2 after 1): row 0 -> 3; index 1 (token 1) lies in an earlier forward
    assert found == [(0, 0, 3), (0, 2, 2), (0, 3, 3)]
    assert copy_targets([s(7, 1, 2, 5, 1, 2)], [2], answers, [[1]]) == [(0, 0, 9), (0, 3, 9)]
    assert copy_targets([s(7, 1, 2)], [0], answers, [[]]) == []  # a row it may not read never copies


def test_an_answer_is_finished_once_and_marked_where_it_ends():
    answers = [[s(1, 2, 3)]]
    end = ANSWER_END
    # 1 2 3 completes the answer at index 2 (marked: nothing may lengthen its word); the "1 2" after it
    # begins nothing more
    assert copy_targets([s(1, 2, 3, 5, 1, 2)], [0], answers, [[0]]) == [(0, 0, 2), (0, 1, 3), (0, 2, end)]
    assert copy_targets([s(5, 1, 2)], [0], answers, [[0]]) == [(0, 1, 2), (0, 2, 3)]
    # the whole answer inside the prompt (its first 4 tokens) finishes nothing: the answer after it is copied
    assert copy_targets([s(1, 2, 3, 5, 1, 2)], [0], answers, [[0]], [4]) == [(0, 0, 2), (0, 1, 3), (0, 4, 2),
                                                                               (0, 5, 3)]


def test_no_answer_begins_inside_a_finished_one():
    # "1961" then "1963": the last "1" of the finished 1961 must not begin 1963 ("1961963")
    answers = [[s(1, 9, 6, 1)], [s(1, 9, 6, 3)]]
    found = copy_targets([s(1, 9, 6, 1)], [0], answers, [[0, 1]])
    assert found[-1] == (0, 3, ANSWER_END) and all(pos < 3 for _, pos, tok in found if tok != ANSWER_END)


def test_apply_copy_makes_the_answer_token_the_argmax_and_maps_positions_when_only_the_last_are_computed():
    logits = torch.zeros(2, 3, 10)
    logits[:, :, 0] = 4.0
    out = apply_copy(logits, [(1, 2, 7)], forward_length=3, margin=5.0)
    assert out[1, 2].argmax().item() == 7 and out[1, 2, 7].item() == pytest.approx(9.0)
    assert torch.equal(out[0], logits[0]) and torch.equal(out[1, :2], logits[1, :2])
    last = apply_copy(logits[:, -1:], [(1, 2, 7), (0, 0, 5)], forward_length=3)  # logits of the last position
    assert last.shape == (2, 1, 10) and last[1, 0].argmax().item() == 7 and torch.equal(last[0], logits[0, -1:])
    assert apply_copy(logits[:, -1:], [(0, 1, 5)], forward_length=3) is None


def test_where_an_answer_ends_no_token_may_lengthen_its_word():
    logits = torch.zeros(1, 2, 10)
    logits[0, :, 3] = 2.0  # token 3 continues the word; token 4 (a space, say) does not
    continuing = torch.tensor([False, False, False, True])  # a vocabulary shorter than the padded logits
    out = apply_copy(logits, [(0, 1, ANSWER_END)], forward_length=2, word_continuing=continuing)
    assert out[0, 1, 3].item() == torch.finfo(out.dtype).min and out[0, 1, 4].item() == 0.0
    assert torch.equal(out[0, 0], logits[0, 0])
    assert apply_copy(logits, [(0, 1, ANSWER_END)], forward_length=2) is None  # no vocabulary rule: untouched


def logits(mem: GistMemory, text: str, read: bool = True) -> torch.Tensor:
    return gate_logits(mem, text, read)[0]  # [T, V]


@pytest.fixture(scope="module")
def copying():
    mem = gated_memory()  # "The capital of Zorbia is Quellton." and "The river of Vantor is the Mizz."
    mem.set_answers({1: "Quellton", 2: "the Mizz"})
    yield mem
    mem.close()


def test_a_begun_answer_of_a_readable_fact_is_finished(copying):
    tok = copying.tokenizer
    text = "The capital of Zorbia is Quel"  # the answer's prefix " Quel": its next token is "l"
    out = logits(copying, text)
    copying.addon.runtime.answer_copy = False
    try:
        alone = logits(copying, text)
    finally:
        copying.addon.runtime.answer_copy = True
    assert out[-1].argmax().item() == tok("l", add_special_tokens=False)["input_ids"][0]
    assert out[-1].amax().item() == pytest.approx(alone[-1].amax().item() + 5.0)
    assert torch.equal(out[-6], alone[-6])  # "s" of "is" begins no answer: the gist's logits as they were


def test_a_query_that_names_no_subject_never_copies(copying):
    text = "The capital of Blargland is Quel"
    assert torch.equal(logits(copying, text), logits(copying, text, read=False))


def test_decoding_steps_copy_from_the_tokens_of_earlier_steps(copying):
    from editors.prefix_cache import cache_kwarg, cache_of

    model, tok = copying.model, copying.tokenizer
    ids = tok("The capital of Zorbia is Que", return_tensors="pt")["input_ids"]
    with copying.reading():
        cache = cache_of(model(ids[:, :-2], use_cache=True))
        model(ids[:, -2:-1], use_cache=True, **{cache_kwarg(model): cache})
        step = model(ids[:, -1:], use_cache=True, **{cache_kwarg(model): cache}).logits[0, -1]
    assert step.argmax().item() == tok("l", add_special_tokens=False)["input_ids"][0]
    assert torch.allclose(step, logits(copying, "The capital of Zorbia is Que")[-1], atol=1e-4)


def test_answers_are_saved_and_loaded_with_the_pool(copying, tmp_path):
    path = copying.pool.save(tmp_path / "pool.safetensors")
    again = GistPool.load(path)
    assert again.view_all().answers == copying.pool.view_all().answers
    assert again.view_all().answers[0][0] == tuple(copying.tokenizer(" Quellton", add_special_tokens=False)["input_ids"])


def test_an_answer_may_be_begun_with_another_first_token_or_capitalised(default_model):
    tok = default_model.tokenizer
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    forms = answer_forms(tok, "Noctuidae")
    assert forms[:2] == [ids(" Noctuidae"), ids("Noctuidae")]  # its own forms first
    assert ids(" N") + ids("octuidae") in forms  # a shorter first token, then the rest as the tokenizer writes it
    assert ids(" Chromosome 19") in answer_forms(tok, "chromosome 19")  # capitalised
    assert ids(" critical") + ids("ly threatened") in answer_forms(tok, "critically threatened")
    assert not any(form[0] == ids(" ")[0] for form in answer_forms(tok, "Lil' Mo"))  # a bare space begins nothing
    # the copy finishes the name from the shorter first token: " N" is followed by "oct"
    variant = [id_string(form) for form in forms]
    question = ids("Which family does Epaspidoceras belong to?")
    text = id_string(question + ids(" N"))
    assert copy_targets([text], [0], [variant], [[0]], [len(question)]) == [(0, len(question), ids("octuidae")[0])]


def test_a_written_answer_is_read_no_more_and_its_word_cannot_run_on(copying):
    from editors.prefix_cache import cache_kwarg, cache_of

    model, tok = copying.model, copying.tokenizer
    prompt = tok("The capital of Zorbia is", return_tensors="pt")["input_ids"]
    answer = tok(" Quellton", add_special_tokens=False)["input_ids"]
    steps = []
    with copying.reading():  # the answer written after the prompt, one decoding step a token
        cache = cache_of(model(prompt, use_cache=True))
        read = []  # per step: does the sequence still read the fact's row (row 0)?
        for token in answer:
            steps.append(model(torch.tensor([[token]]), use_cache=True, **{cache_kwarg(model): cache}).logits[0, -1])
            visible = copying.addon.runtime.visible_dense()
            read.append(visible is None or bool(visible[0, 0]))
    assert read[:-1] == [True] * (len(answer) - 1) and read[-1] is False  # read until its answer is written
    lowest = torch.finfo(steps[-1].dtype).min
    assert steps[-1][tok("i", add_special_tokens=False)["input_ids"][0]].item() == lowest  # no "Quelltoni"
    assert steps[-1][tok(".", add_special_tokens=False)["input_ids"][0]].item() > lowest
    assert steps[-2].argmax().item() == answer[-1]  # one token before its end the copy still finishes it
