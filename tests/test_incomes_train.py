"""Training the gist add-on: data, sampler, objective, checkpoints, time budgets (tiny models)."""
from __future__ import annotations

import pytest
import torch

from editors.incomes import GistAddon, GistConfig
from editors.incomes.introspect import find_attentions, split_call
from editors.model import tiny_llama, tiny_tokenizer
from tests.test_incomes import FACTS, IDS, VOCAB, attached

def _synthetic_facts(n: int):
    from editors.incomes.traindata import Query, TrainFact

    names = [f"Person{i}" for i in range(n)]
    return [TrainFact(f"{p} lives in Town{i % 7}.", Query(f"{p} lives in", f"Town{i % 7}", "edit"),
                      (Query(f"The home of {p} is", f"Town{i % 7}", "paraphrase"),),
                      (Query("The sky is", "blue", "locality"),)) for i, p in enumerate(names)]


def test_train_runs_resumes_and_saves(tmp_path):
    import json

    from editors.incomes.train import TrainConfig, train

    facts = _synthetic_facts(30)
    cfg = TrainConfig(steps=2, batch_size=2, chunk_sizes=(4, 8), chunk_probs=(0.5, 0.5), holdout=6, eval_every=2,
                      eval_facts=6, save_every=1, warmup=1, compress_batch=8)
    model = tiny_llama(vocab_size=VOCAB).requires_grad_(False)
    base = model(IDS).logits
    train(model, tiny_tokenizer(), facts, cfg, GistConfig(adapter_rank=2), tmp_path, command="test")
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [1, 2]
    assert all(math_ok(r["loss"]) for r in lines if "loss" in r)
    assert "edit_success" in lines[-1]["heldout"]
    longer = TrainConfig(**{**cfg.__dict__, "steps": 3})
    addon = train(model, tiny_tokenizer(), facts, longer, GistConfig(adapter_rank=2), tmp_path, command="test")
    steps = [json.loads(line).get("step") for line in (tmp_path / "log.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3]  # resumed at step 2, not restarted
    saved = json.loads((tmp_path / "addon" / "gist_addon.json").read_text())
    assert saved["extra"]["command"] == "test" and saved["extra"]["steps"] == 3
    assert torch.equal(model(IDS).logits, base)  # detached after training: the base is untouched
    assert not torch.equal(addon.gist_embedding, GistAddon.for_model(model).gist_embedding)


def math_ok(x: float) -> bool:
    return x == x and abs(x) != float("inf")


# -- training: tokenisation, objective, sampler, time budget, bf16 -----------------------------------

@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine: one torch thread is ~50x faster than two (no OMP contention)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_tokens_match_the_harness_and_encode_aligns_teacher_and_student():
    from editors.incomes.objective import Tokens, encode
    from editors.incomes.traindata import Query
    from evaluation.metrics import encode_target

    tok = tiny_tokenizer()
    tokens = Tokens(tok)
    queries = [Query("Ann lives in", "Rome", "edit"), Query("The sky is", "blue", "locality")]
    tokens.warm(["Ann lives in Rome"], queries)
    for q in queries:
        assert tokens.query(q.prompt, q.answer) == encode_target(tok, q.prompt, q.answer)
    enc = encode(tokens, queries, ["Ann lives in Rome", "Bob lives in Oslo"], "cpu")
    student = enc.student_ids[enc.s_rows, enc.s_cols + 1]  # the token each scored position predicts
    teacher = enc.teacher_ids[enc.s_rows, enc.t_cols + 1]
    assert torch.equal(student, enc.targets) and torch.equal(teacher, enc.targets)
    answers = "".join(tok.decode([int(t)]) for t in enc.targets[enc.answer & enc.with_fact])
    assert answers.strip() == "Rome"
    assert not bool(enc.with_fact[enc.query_of == 1].any())  # a locality query: the no-fact teacher


def test_after_answer_scores_what_follows_the_answer():
    from editors.incomes.objective import encode
    from editors.incomes.traindata import Query

    tok = tiny_tokenizer()
    queries = [Query("Ann lives in", "Rome", "edit"), Query("The sky is", "blue", "locality")]
    facts = ["Ann lives in Rome", "Bob lives in Oslo"]
    plain = encode(tok, queries, facts, "cpu")
    after = encode(tok, queries, facts, "cpu", after_answer=True)
    assert after.s_rows.numel() == plain.s_rows.numel() + 2  # one more position per query
    for b in range(2):
        cols = after.s_cols[after.s_rows == b]
        last = int(after.student_mask[b].sum()) - 1
        assert int(cols.max()) == last  # the query's last token: its logits predict what follows
        extra = (after.s_rows == b) & (after.s_cols == last)
        assert not bool(after.answer[extra].any())  # KL only: w = 0, no accuracy counted there
        t_last = int(after.teacher_mask[b].sum()) - 1
        assert int(after.t_cols[extra]) == t_last  # aligned with the teacher's last token
    assert torch.equal(after.answer.sum(), plain.answer.sum())
    assert int(after.after.sum()) == 2 and not bool(plain.after.any())  # flagged for after_answer_weight


def test_after_answer_weight_scales_the_kl_after_a_fact_query_s_answer(one_thread):
    from editors.incomes.compress import compress_texts
    from editors.incomes.objective import encode, student_loss, teacher_targets
    from editors.incomes.traindata import Query

    model = tiny_llama(vocab_size=VOCAB)
    addon = attached(model, adapter_rank=2)
    tok = tiny_tokenizer()
    queries = [Query("Ann lives in", "Rome", "edit"), Query("The sky is", "blue", "locality")]
    facts = ["Ann lives in Rome", "Bob lives in Oslo"]
    enc = encode(tok, queries, facts, "cpu", after_answer=True)
    teacher, w = teacher_targets(model, addon, enc)
    gists = compress_texts(model, tok, addon, facts)
    loss = {k: student_loss(model, addon, enc, gists, teacher, w, after_answer_weight=k)[0] for k in (1.0, 4.0)}
    with addon.use(gists):
        from editors.incomes.objective import _logp

        student = _logp(model, enc.student_ids, enc.student_mask, enc.s_rows, enc.s_cols)
    kl = torch.nn.functional.kl_div(student, teacher, reduction="none", log_target=True).sum(-1)
    only = enc.after & enc.with_fact  # the edit query's after-answer position; the locality one keeps 1
    assert int(only.sum()) == 1
    expected = loss[1.0] + 3.0 * kl[only].sum() / kl.numel()
    torch.testing.assert_close(loss[4.0], expected, atol=1e-5, rtol=1e-5)
    # the later-answer weight: CE and KL on the edit's answer tokens after its first (" Rome" is 5 characters: 4 later)
    weighted, stats = student_loss(model, addon, enc, gists, teacher, w, ce_weight=0.5, later_answer_weight=3.0)
    later = enc.answer & enc.with_fact & (torch.cumsum((enc.answer & enc.with_fact).long(), 0) > 1)
    assert int(later.sum()) == 4
    ce = -student.gather(1, enc.targets[:, None])[:, 0]
    plain = student_loss(model, addon, enc, gists, teacher, w, ce_weight=0.5)[0]
    torch.testing.assert_close(weighted, plain + 2.0 * (0.5 * w * ce + kl)[later].sum() / kl.numel(),
                               atol=1e-5, rtol=1e-5)
    hits = (student.argmax(-1) == enc.targets)[later].float().mean()
    torch.testing.assert_close(stats["acc_later"], hits)


def test_merged_teacher_forward_matches_separate_forwards(one_thread):
    from editors.incomes.objective import _logp, encode, teacher_targets
    from editors.incomes.traindata import Query

    model = tiny_llama(vocab_size=VOCAB)
    addon = attached(model, adapter_rank=2)
    tok = tiny_tokenizer()
    queries = [Query("Ann lives in", "Rome", "edit"), Query("A long prompt about it:", "x", "paraphrase")]
    enc = encode(tok, queries, ["Ann lives in Rome", "Ann lives in Rome and more words here"], "cpu")
    teacher, w = teacher_targets(model, addon, enc)
    with_fact = _logp(model, enc.teacher_ids, enc.teacher_mask, enc.s_rows, enc.t_cols)
    without = _logp(model, enc.student_ids, enc.student_mask, enc.s_rows, enc.s_cols)
    assert torch.allclose(teacher, with_fact, atol=1e-5)
    gain = without.gather(1, enc.targets[:, None])[:, 0] - with_fact.gather(1, enc.targets[:, None])[:, 0]
    assert torch.allclose(w, (-gain).clamp(min=0) * enc.answer, atol=1e-5)


def test_sink_init_sets_zero_keys_to_position_zero_keys(one_thread):
    from editors.incomes.compress import init_zero_keys_at_sink

    model = tiny_llama(vocab_size=VOCAB)
    addon = attached(model, adapter_rank=2, gate_init=0.0)
    init_zero_keys_at_sink(model, addon, FACTS, pad_id=0)
    layer = addon.layer_ids[0]
    attn = find_attentions(model)[layer]
    h = {}

    def keep(module, args, kwargs):
        h["x"] = split_call(args, kwargs)[0]  # [B, T, C], the attention's input

    handle = attn.register_forward_pre_hook(keep, with_kwargs=True)
    model(torch.tensor([[f[0] for f in FACTS]]).T)  # [4, 1]: each fact's first token at position 0
    handle.remove()
    want = attn.k_proj(h["x"][:, 0]).view(len(FACTS), -1, addon.dims.head_dim).mean(0)  # [KVH, D]
    assert torch.allclose(addon.branches[str(layer)].zero_key, want, atol=1e-5)


def test_train_with_a_time_budget_stops_checks_and_saves(tmp_path, one_thread):
    import json
    import time

    from editors.incomes.train import TrainConfig, train

    facts = _synthetic_facts(40)
    cfg = TrainConfig(steps=100000, batch_size=2, chunk_sizes=(4, 8), chunk_probs=(0.5, 0.5), holdout=12,
                      eval_facts=6, eval_every=0, eval_seconds=1.0, save_every=0, save_seconds=1.0, warmup=2,
                      compress_batch=8, time_budget=8.0, log_every=5, distractor_grad=True, curriculum=0.5,
                      fast_lr_mult=5.0, zero_key_init="sink", period_prob=0.5, locality_weight=2.0, ce_weight=0.5)
    model = tiny_llama(vocab_size=VOCAB).requires_grad_(False)
    began = time.monotonic()
    train(model, tiny_tokenizer(), facts, cfg, GistConfig(adapter_rank=2, gate_init=0.0), tmp_path / "run",
          command="test", checkpoint_dir=tmp_path / "ckpt")
    assert time.monotonic() - began < 8.0 + 4.0
    lines = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "loss" in r]
    assert steps and all(math_ok(r["loss"]) and r["steps_per_s"] > 0 for r in steps)
    assert lines[0].get("check") and lines[0]["step"] == 0  # the baseline check
    finals = [r for r in lines if r.get("final")]
    assert len(finals) == 1 and finals[0]["heldout"]["n_facts"] == 12 and finals[0]["heldout"]["n_gists"] == 6
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["addon", "best", "log.jsonl"]
    saved = json.loads((tmp_path / "run" / "addon" / "gist_addon.json").read_text())
    assert saved["extra"]["steps"] == steps[-1]["step"] and "edit_success" in saved["extra"]["heldout"]
    assert (tmp_path / "ckpt" / "optimizer.safetensors").exists()


def test_train_bf16_autocast_keeps_float32_addon(tmp_path, one_thread):
    from editors.incomes.train import TrainConfig, train

    facts = _synthetic_facts(30)
    cfg = TrainConfig(steps=2, batch_size=2, chunk_sizes=(4,), chunk_probs=(1.0,), holdout=6, eval_every=0,
                      eval_facts=6, save_every=0, warmup=1, compress_batch=8, amp="bf16", distractor_grad=True)
    model = tiny_llama(vocab_size=VOCAB).requires_grad_(False).to(torch.bfloat16)
    addon = train(model, tiny_tokenizer(), facts, cfg, GistConfig(adapter_rank=2, gate_init=0.0), tmp_path,
                  command="test")
    assert all(p.dtype == torch.float32 for p in addon.parameters())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_train_cli_parses_booleans_and_new_flags():
    from editors.incomes.train import _parser

    args = _parser().parse_args(["--distractor-grad", "true", "--time-budget", "30", "--amp", "bf16",
                                 "--zero-key-init", "sink", "--batch-size", "4", "--batch-size", "8"])
    assert args.distractor_grad is True and args.time_budget == 30.0 and args.amp == "bf16"
    assert args.zero_key_init == "sink" and args.batch_size == 8  # the last flag wins (GIST_ARGS overrides)
    assert _parser().parse_args(["--distractor-grad", "false"]).distractor_grad is False


def test_train_skips_a_step_that_runs_out_of_memory(tmp_path, one_thread, monkeypatch):
    import json

    from editors.incomes import train as train_module

    real, calls = train_module.train_step, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise torch.cuda.OutOfMemoryError("simulated")
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", flaky)
    cfg = train_module.TrainConfig(steps=3, batch_size=2, chunk_sizes=(4,), chunk_probs=(1.0,), holdout=6,
                                   eval_every=0, eval_facts=6, save_every=0, warmup=1, compress_batch=8)
    model = tiny_llama(vocab_size=VOCAB).requires_grad_(False)
    train_module.train(model, tiny_tokenizer(), _synthetic_facts(30), cfg, GistConfig(adapter_rank=2), tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [1, 3] and {"step": 2, "oom": True} in lines


def test_data_seed_changes_the_draws_and_keeps_the_holdout(tmp_path, one_thread, monkeypatch):
    from editors.incomes import train as train_module

    seen = {}

    class Spy(train_module.ChunkSampler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen["seed"] = self.seed

    monkeypatch.setattr(train_module, "ChunkSampler", Spy)
    real_split, held = train_module.split_holdout, []
    monkeypatch.setattr(train_module, "split_holdout",
                        lambda facts, n, seed: held.append(real_split(facts, n, seed)[1]) or real_split(facts, n, seed))
    model = tiny_llama(vocab_size=VOCAB).requires_grad_(False)
    for data_seed in (None, 5):
        cfg = train_module.TrainConfig(steps=1, batch_size=2, chunk_sizes=(4,), chunk_probs=(1.0,), holdout=6,
                                       eval_every=0, eval_facts=0, save_every=0, warmup=1, compress_batch=8,
                                       seed=3, data_seed=data_seed)
        train_module.train(model, tiny_tokenizer(), _synthetic_facts(30), cfg, GistConfig(adapter_rank=2),
                           tmp_path / str(data_seed))
        assert seen["seed"] == (3 if data_seed is None else 5)
    assert held[0] == held[1]  # the same facts held out either way


def test_train_warm_starts_from_a_saved_addon(tmp_path, one_thread):
    from editors.incomes.train import TrainConfig, train

    facts = _synthetic_facts(30)
    cfg = TrainConfig(steps=1, batch_size=2, chunk_sizes=(4,), chunk_probs=(1.0,), holdout=6, eval_every=0,
                      save_every=1, warmup=1, compress_batch=8, lr=1e-9, fast_lr_mult=1.0, question_twins=1.0)
    model = tiny_llama(vocab_size=VOCAB).requires_grad_(False)
    first = GistAddon.for_model(model, GistConfig(adapter_rank=2, zero_key_init_std=0.3))
    first.save(tmp_path / "first")
    warm = train(model, tiny_tokenizer(), facts, cfg, GistConfig(adapter_rank=2), tmp_path / "run",
                 init_addon=tmp_path / "first")
    for name, value in first.state_dict().items():  # lr ~0: the warm start kept the saved weights (no sink init)
        torch.testing.assert_close(warm.state_dict()[name], value, atol=1e-6, rtol=0)


def test_heldout_check_scores_locality_on_the_facts_own_subject(one_thread):
    from dataclasses import replace

    from editors.incomes.objective import heldout_check
    from editors.incomes.traindata import Query

    model = tiny_llama(vocab_size=VOCAB).requires_grad_(False)
    addon = attached(model)  # gates start at 0: the pool changes nothing, so locality agrees everywhere
    facts = _synthetic_facts(6)
    check = heldout_check(model, tiny_tokenizer(), addon, facts)
    assert check["locality"] == 1.0 and "subject_locality" not in check  # no fact asks its own subject
    assert 0.0 <= check["later_tokens"] <= 1.0  # " TownN": five answer tokens after the first
    own = [replace(f, subject=f"Person{i}", locality=f.locality + (Query(f"The age of Person{i} is", "9", "locality"),))
           for i, f in enumerate(facts[:4])]
    check = heldout_check(model, tiny_tokenizer(), addon, own + facts[4:])
    assert check["subject_locality"] == 1.0 and check["n_facts"] == 6
    addon.detach()


def test_later_answer_tokens_are_the_answer_tokens_after_each_querys_first():
    from editors.incomes.objective import _later_answer_tokens, encode
    from editors.incomes.traindata import Query

    queries = [Query("Ann lives in", "Rome", "edit"), Query("Bo is", "x", "edit"), Query("Cy eats", "figs", "edit")]
    enc = encode(tiny_tokenizer(), queries, None, "cpu")  # one token per character: " Rome" is 5 answer tokens
    later = _later_answer_tokens(enc)
    per_query = [int(later[enc.query_of == i].sum()) for i in range(3)]
    assert per_query == [4, 1, 4]  # " x" is two tokens: its "x" is the only later one
    assert not (later & ~enc.answer).any()


def test_continuations_are_scored_after_the_answer_as_kl_only_positions():
    import random

    from editors.incomes.objective import Tokens, encode
    from editors.incomes.objective import continuations
    from editors.incomes.traindata import Query

    tokens = Tokens(tiny_tokenizer())
    queries = [Query("Ann lives in", "Rome", "edit"), Query("Bo is", "x", "edit")]
    plain = encode(tokens, queries, ["Ann lives in Rome", "Bo is x"], "cpu")
    more = encode(tokens, queries, ["Ann lives in Rome", "Bo is x"], "cpu", continuations=[[5, 6, 7], []])
    assert more.targets.numel() == plain.targets.numel() + 3  # three more scored positions, all in query 0
    assert torch.equal(more.answer[:plain.answer.numel()][plain.query_of == 0], plain.answer[plain.query_of == 0])
    tail = more.query_of == 0
    assert more.after[tail].tolist()[-3:] == [True] * 3 and not more.answer[tail][-3:].any()
    assert more.targets[tail][-3:].tolist() == [5, 6, 7]
    assert not more.after[more.query_of == 1].any()
    facts = _synthetic_facts(5)
    drawn = continuations(tokens, facts, 200, random.Random(0), 0.5)
    assert 60 < sum(bool(c) for c in drawn) < 140 and continuations(tokens, facts, 3, random.Random(0), 0.0) is None
    assert all(tokens.tokenizer.decode(c).startswith("\nPerson") for c in drawn if c)
