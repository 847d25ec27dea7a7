"""Training data for the gist add-on: the chunk sampler, question twins, subject locality, rare answers."""
from __future__ import annotations

import pytest

from tests.test_incomes_train import _synthetic_facts


def test_chunk_sampler_curriculum_and_distractors():
    from editors.incomes.traindata import ChunkSampler

    facts = _synthetic_facts(300)
    sampler = ChunkSampler(300, 8, (8, 16, 64), (0.0, 0.5, 0.5), curriculum=0.5)
    assert sampler.step(0, facts, progress=0.0).distractors == []  # smallest pool first
    assert {len(sampler.step(s, facts, progress=0.3).distractors) for s in range(40)} <= {0, 8}
    sizes = {8 + len(sampler.step(s, facts, progress=0.9).distractors) for s in range(40)}
    assert sizes == {16, 64}  # after the curriculum: the configured probabilities
    plan = sampler.step(3, facts, progress=1.0)
    assert len(set(plan.relevant + plan.distractors)) == len(plan.relevant) + len(plan.distractors)
    assert sampler.step(3, facts, progress=1.0) == plan  # deterministic per step


def test_fact_text_matches_the_harness_statement():
    import random

    from editors.incomes.traindata import fact_text, parse_record
    from evaluation.methods import statement

    fact = parse_record({"prompt": "Ann lives in", "target_new": "Rome"})
    assert fact.text == statement("Ann lives in", "Rome")
    rng = random.Random(0)
    assert {fact_text(fact, rng, 0.5) for _ in range(50)} == {"Ann lives in Rome", "Ann lives in Rome."}


def test_chunk_sampler_shrinks_small_pools_and_fills_to_the_last_fact():
    from editors.incomes.traindata import ChunkSampler

    facts = _synthetic_facts(20)
    shrink = ChunkSampler(20, 8, (4, 20), (0.5, 0.5), shrink_batch=True)
    plans = [shrink.step(s, facts) for s in range(30)]
    assert {(len(p.relevant), len(p.distractors)) for p in plans} == {(4, 0), (8, 12)}  # all 20 facts in a pool
    assert all(len(p.queries) == len(p.relevant) for p in plans)
    raised = ChunkSampler(20, 8, (4, 20), (0.5, 0.5))
    assert {len(raised.step(s, facts).relevant) for s in range(30)} == {8}


def test_chunk_sampler_draws_long_answer_facts_at_their_share():
    from editors.incomes.traindata import ChunkSampler
    from memory.errors import ConfigError

    facts = _synthetic_facts(200)
    long_answer = [i < 20 for i in range(200)]  # a tenth of the facts
    sampler = ChunkSampler(200, 8, (8,), (1.0,), long_answer=long_answer, long_share=0.5)
    drawn = [i for s in range(200) for i in sampler.step(s, facts).relevant]
    share = sum(i < 20 for i in drawn) / len(drawn)
    assert 0.45 < share < 0.55  # drawn at the asked share, not at their tenth
    assert all(len(set(sampler.step(s, facts).relevant)) == 8 for s in range(20))  # no fact twice in a pool
    assert sampler.step(3, facts) == sampler.step(3, facts)  # deterministic per step (resumable)
    plain = ChunkSampler(200, 8, (8,), (1.0,))
    plain_drawn = [i for s in range(200) for i in plain.step(s, facts).relevant]
    assert sum(i < 20 for i in plain_drawn) / len(plain_drawn) < 0.15
    with pytest.raises(ConfigError, match="long-answer"):
        ChunkSampler(200, 8, (8,), (1.0,), long_answer=[i < 4 for i in range(200)], long_share=0.5)


def test_question_twins_ask_the_fact_as_a_question():
    from editors.incomes.traindata import Query, TrainFact, question_of, question_twin, with_question_twins

    assert question_of("The mother tongue of Danielle Darrieux is") == "What is the mother tongue of Danielle Darrieux?"
    assert question_of("The founders of X were") == "What were the founders of X?"
    assert question_of("Apple A5 was created by") == "Apple A5 was created by what?"
    assert question_of("Mukkam, in") is None and question_of("What is the twin city of Lyon? It is") is None
    fact = TrainFact("The capital of Zorbia is Quellton", Query("The capital of Zorbia is", "Quellton", "edit"),
                     (), (Query("The sky is", "blue", "locality"),))
    twin = question_twin(fact)
    assert twin.text == "What is the capital of Zorbia? Quellton"
    assert twin.edit == Query("What is the capital of Zorbia?", "Quellton", "edit")
    assert fact.edit.prompt in [p.prompt for p in twin.paraphrases] and twin.locality == fact.locality
    assert with_question_twins([fact], 0.0) == [fact]
    assert with_question_twins([fact], 1.0) == [fact, twin]


def test_question_forms_follow_the_relation_of_the_prompt():
    import random

    from editors.incomes.questions import question_of, relation_questions
    from editors.incomes.traindata import Query, TrainFact, question_twin

    assert relation_questions("Danielle Darrieux is a native speaker of", "Danielle Darrieux")[0] == \
        "What language does Danielle Darrieux speak?"
    assert question_of("In Mistretta, the language spoken is", "Mistretta") == "What is the language of Mistretta?"
    assert question_of("Ralph Habib died in", "Ralph Habib") == "Where did Ralph Habib die?"
    assert question_of("The name of the father of Wang Jipeng is", "Wang Jipeng") == "Who is the father of Wang Jipeng?"
    forms = relation_questions("The name of the father of Wang Jipeng is", "Wang Jipeng")
    assert question_of("The name of the father of Wang Jipeng is", "Wang Jipeng", random.Random(1)) in forms
    assert relation_questions("Lyon is a town", "Paris") == ()  # the subject must be in the prompt
    fact = TrainFact("Toko Yasuda works for Sony", Query("Toko Yasuda works for", "Sony", "edit"), (), (),
                     "Toko Yasuda")
    twin = question_twin(fact)
    assert twin.text == "Who is the employer of Toko Yasuda? Sony" and twin.subject == "Toko Yasuda"
    assert [p.prompt for p in twin.paraphrases] == ["Who does Toko Yasuda work for?", "Toko Yasuda works for"]


def test_subject_locality_asks_the_facts_own_subject_another_relation():
    from editors.incomes.traindata import Query, TrainFact, with_subject_locality

    def fact(subject, prompt, answer, probes=()):
        locality = tuple(Query(p, a, "locality") for p, a in probes)
        return TrainFact(f"{prompt} {answer}", Query(prompt, answer, "edit"), (), locality, subject)

    wiki = fact("Ada Moss", "The occupation of Ada Moss is", "chemist",
                [("The name of the father of Ada Moss is", "Tom Moss"), ("The gender of Ada Moss is", "female"),
                 ("The capital of Kingdom of Ada Moss is", "Nowhere"), ("Ben Cole was born in", "Leeds")])
    counterfact = fact("Zorbia", "The capital of Zorbia is", "Quellton", [("The capital of Yemen is", "Sanaa")])
    nameless = fact("", "The sky is", "blue")
    facts = [wiki, counterfact, nameless]
    assert with_subject_locality(facts, 0) == facts
    out = with_subject_locality(facts, 6, seed=3)
    assert out[0].locality[:4] == wiki.locality and out[2] == nameless  # originals kept first; no subject, no query
    added = out[1].locality[1:]
    assert added and {q.kind for q in added} == {"locality"}
    relations = {"father": "Tom Moss", "gender": "female"}  # "capital of Kingdom" is a name, not a relation
    for q in added:
        relation = next(r for r in relations if r in q.prompt)
        assert q.prompt in (f"The {relation} of Zorbia is", f"Zorbia {relation}") and q.answer == relations[relation]
    assert not any("occupation" in q.prompt for q in out[0].locality[4:])  # never the fact's own relation


def test_rare_answer_twins_give_a_made_up_answer_to_every_query_of_the_fact():
    import random

    from editors.incomes.rare_answers import made_up_name, rare_answer_twins
    from editors.incomes.traindata import Query, TrainFact

    fact = TrainFact("The capital of Zorbia is Quellton", Query("The capital of Zorbia is", "Quellton", "edit"),
                     (Query("Zorbia's capital city is", "Quellton", "paraphrase"),),
                     (Query("The sky is", "blue", "locality"),), "Zorbia")
    names = {made_up_name(random.Random(i)) for i in range(200)}
    assert len(names) > 190 and all(n[:1].isupper() and n.replace(" ", "").isalpha() for n in names)
    assert rare_answer_twins([fact], 0.0) == []
    twins = rare_answer_twins([fact] * 40, 1.0, seed=5)
    assert len(twins) == 40 and twins == rare_answer_twins([fact] * 40, 1.0, seed=5)  # deterministic
    for twin in twins:
        answer = twin.edit.answer
        assert answer != "Quellton" and twin.text == f"{twin.edit.prompt} {answer}"
        assert twin.paraphrases and all(q.answer == answer for q in twin.paraphrases)
        assert twin.locality == fact.locality and twin.subject == "Zorbia"
    prompts = {t.edit.prompt for t in twins}  # half asked as the cloze, half as a question
    assert "The capital of Zorbia is" in prompts and any(p.endswith("Zorbia?") for p in prompts)
