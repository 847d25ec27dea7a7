"""`engram demo`: the main job end to end on the embedded default model, on a fresh demo store.

Load the model, ingest authored counterfacts (twice, to show dedupe), generate contexts, answer before
any edit, write a few facts into the weights with ICE (sequentially, recorded as deltas), answer again
next to the RAG and ICL baselines, check unrelated prompts, put other facts into the gist pool, and roll
one edit back.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from agent.commands.common import load, note
from memory.store import REPO_ROOT, FactStore

UNRELATED = ["The capital of Spain is", "The largest ocean on Earth is the", "Water is made of hydrogen and"]


def _configure_demo(p) -> None:
    p.add_argument("--workdir", default=str(REPO_ROOT / "runs" / "demo"), help="where the demo writes its store and files")
    p.add_argument("--generator", default="local", choices=["local", "template", "openai"],
                   help="context generator for the facts the demo edits (the rest get templates)")
    p.add_argument("--edits", type=int, default=3, help="how many facts to write into the weights with ICE")
    p.add_argument("--method", default="ice", help="weight editor for the demo edits (ice or ftm)")


def _fresh_store(args) -> tuple[FactStore, Path, str]:
    import shutil

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    for old in workdir.glob("store.*"):
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    db = args.db or f"sqlite:///{workdir / 'store.sqlite'}"
    return FactStore(db), workdir, db


def _answers(loaded, prompts, max_new_tokens=6):
    from editors.answer import generate_greedy

    return generate_greedy(loaded.model, loaded.tokenizer, prompts, max_new_tokens=max_new_tokens)


def _baselines(loaded, store, facts) -> tuple[list[str], list[str]]:
    """RAG (top-3 of all facts by MiniLM) and ICL (all facts) answers to the edited prompts."""
    from editors.prompting import icl_prompt, rag_prompt
    from memory.vector import VectorIndex

    active = store.list_facts()
    index = VectorIndex()
    index.add([f.id for f in active], [f.statement for f in active])
    by_id = {f.id: f.statement for f in active}
    rag = [rag_prompt([by_id[i] for i, _ in index.search(f.prompt, k=3)], f.prompt, style="completion") for f in facts]
    icl = [icl_prompt([f.statement for f in active], f.prompt, loaded.tokenizer, 4000, style="completion").prompt
           for f in facts]
    return _answers(loaded, rag), _answers(loaded, icl)


def _gist_route(loaded, facts, before: dict[str, str], unrelated_before: list[str]) -> None:
    """Compress `facts` into a gist pool with the shipped add-on and answer from it (base weights)."""
    from editors.incomes.memory import GistMemory
    from memory.errors import ConfigError

    try:
        memory = GistMemory.open(loaded.model, loaded.tokenizer, loaded.name)
    except ConfigError as exc:
        print(f"   skipped: {exc}")
        return
    try:
        start = time.perf_counter()
        memory.add([f.id for f in facts], [f.statement for f in facts], subjects=[f.subject for f in facts],
                   prompts=[f.prompt for f in facts], answers=[f.target for f in facts])
        print(f"   {len(facts)} facts compressed in {time.perf_counter() - start:.2f} s, "
              f"{memory.pool.bytes_per_fact():,} bytes each")
        with memory.reading():
            answers = _answers(loaded, [f.prompt for f in facts])
            unrelated = _answers(loaded, UNRELATED)
        for fact, answer in zip(facts, answers):
            print(f"   {fact.prompt} -> {answer!r} (before: {before[fact.prompt]!r}, target {fact.target})")
        same = sum(x == y for x, y in zip(unrelated_before, unrelated))
        print(f"   unrelated prompts unchanged with the pool active: {same}/{len(UNRELATED)} "
              "(they name no pooled subject, so the mention gate hides every gist)")
    finally:
        memory.close()


def cmd_demo(args) -> int:
    from agent.demo_facts import DEMO_FACTS
    from agent.enrich import enrich, generator_from_args
    from agent.ingest import ingest_path
    from editors.registry import make_editor
    from editors.state import ModelState

    store, workdir, db = _fresh_store(args)
    facts_file = workdir / "facts.jsonl"
    facts_file.write_text("".join(json.dumps(f) + "\n" for f in DEMO_FACTS))

    print(f"== 1. load the default model ({args.model})")
    loaded = load(args)
    print(f"   loaded in {loaded.seconds:.1f} s ({'from the safetensors cache' if loaded.from_cache else 'converted from GGUF'}) on {loaded.device}")

    print(f"== 2. ingest {len(DEMO_FACTS)} counterfactual facts into {db}")
    print(f"   {ingest_path(store, str(facts_file)).summary()}")
    print(f"   ingesting the same file again: {ingest_path(store, str(facts_file)).summary()}")

    facts = store.list_facts()
    chosen = facts[: args.edits]
    print(f"== 3. paraphrase contexts ({args.generator} for the {len(chosen)} facts to edit, templates for the rest)")
    start = time.perf_counter()
    made = enrich(store, chosen, generator_from_args(args.generator, loaded))
    enrich(store, facts[len(chosen):], generator_from_args("template", None))
    print(f"   {made.contexts} contexts for {made.facts} facts in {time.perf_counter() - start:.1f} s ({made.failures} failures)")
    for ctx in store.contexts(chosen[0].id)[:3]:
        print(f"   e.g. [{ctx.generator}] {ctx.text}")

    print("== 4. the model's answers before any edit")
    before = _answers(loaded, [f.prompt for f in facts])
    for fact, answer in zip(facts, before):
        print(f"   {fact.prompt} -> {answer!r}  (new target: {fact.target})")
    print(f"   the unedited model gives the new target for "
          f"{sum(a.lower().startswith(f.target.lower()) for f, a in zip(facts, before))}/{len(facts)} prompts")
    unrelated_before = _answers(loaded, UNRELATED)

    print(f"== 5. write {len(chosen)} facts into the weights with {args.method}, one after another")
    state = ModelState(store, loaded.model)
    editor = make_editor(args.method, loaded.model, loaded.tokenizer)
    for fact in chosen:
        done = state.apply(fact, editor, args.method)
        print(f"   fact {fact.id} ({fact.target}): {'applied' if done.ok else 'FAILED ' + str(done.error)}, "
              f"{done.steps} steps, loss {done.loss:.3f}, {done.seconds:.1f} s -> model version {done.model_version}")

    print("== 6. answers after the edits, next to the RAG and ICL baselines (unedited model + facts in the prompt)")
    after = _answers(loaded, [f.prompt for f in chosen])
    with state.unedited():  # the baselines answer with the base model
        rag, icl = _baselines(loaded, store, chosen)
    for fact, a, r, i in zip(chosen, after, rag, icl):
        print(f"   {fact.prompt} -> edited {a!r} | rag {r!r} | icl {i!r}  (target {fact.target})")
    unrelated_after = _answers(loaded, UNRELATED)
    same = sum(x == y for x, y in zip(unrelated_before, unrelated_after))
    print(f"   unrelated prompts unchanged: {same}/{len(UNRELATED)}")
    for prompt, x, y in zip(UNRELATED, unrelated_before, unrelated_after):
        print(f"     {prompt} -> {y!r}" + ("" if x == y else f" (was {x!r})"))

    pooled = facts[len(chosen):len(chosen) + 5]
    print(f"== 7. the gist route: {len(pooled)} other facts into the InComeS pool (one forward, no weight change)")
    with state.unedited():
        _gist_route(loaded, pooled, dict(zip([f.prompt for f in facts], before)), unrelated_before)

    print(f"== 8. roll back the edit of fact {chosen[0].id}")
    version = state.rollback(chosen[0].id, editors={args.method: editor})  # later facts are edited again
    for fact, answer in zip(chosen, _answers(loaded, [f.prompt for f in chosen])):
        print(f"   model version {version}; {fact.prompt} -> {answer!r}"
              + (" (rolled back)" if fact.id == chosen[0].id else f" (target {fact.target})"))
    counts = store.counts()
    print(f"== done: {counts['facts']['active']} active facts, edits {json.dumps(counts['edits'])}")
    note(f"demo store: {db} (try: engram ask --db {db} \"{chosen[-1].prompt}\")")
    return 0


COMMANDS = {"demo": (cmd_demo, _configure_demo, "run the main job end to end on the default model")}
