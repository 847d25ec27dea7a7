"""`engram demo`: the main job end to end on the embedded default model, on a fresh demo store."""
from __future__ import annotations

import json
import time
from pathlib import Path

from agent.commands.common import load, note
from memory.store import REPO_ROOT, FactStore


def _configure_demo(p) -> None:
    p.add_argument("--workdir", default=str(REPO_ROOT / "runs" / "demo"), help="where the demo writes its store and files")
    p.add_argument("--generator", default="local", choices=["local", "template", "openai"])


def cmd_demo(args) -> int:
    from agent.demo_facts import DEMO_FACTS
    from agent.enrich import enrich, generator_from_args
    from agent.ingest import ingest_path
    from editors.answer import generate_greedy

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    for old in workdir.glob("store.sqlite*"):
        old.unlink()
    db = args.db or f"sqlite:///{workdir / 'store.sqlite'}"
    facts_file = workdir / "facts.jsonl"
    facts_file.write_text("".join(json.dumps(f) + "\n" for f in DEMO_FACTS))

    print(f"== 1. load the default model ({args.model})")
    loaded = load(args)
    print(f"   loaded in {loaded.seconds:.1f} s ({'from the safetensors cache' if loaded.from_cache else 'converted from GGUF'}) on {loaded.device}")

    print(f"== 2. ingest {len(DEMO_FACTS)} counterfactual facts into {db}")
    store = FactStore(db)
    report = ingest_path(store, str(facts_file))
    print(f"   {report.summary()}")
    again = ingest_path(store, str(facts_file))
    print(f"   ingesting the same file again: {again.summary()}")

    print(f"== 3. generate paraphrase contexts ({args.generator})")
    start = time.perf_counter()
    generator = generator_from_args(args.generator, loaded)
    made = enrich(store, store.list_facts(), generator)
    print(f"   {made.contexts} contexts for {made.facts} facts in {time.perf_counter() - start:.1f} s ({made.failures} failures)")
    first = store.list_facts(limit=1)[0]
    for ctx in store.contexts(first.id)[:3]:
        print(f"   e.g. [{ctx.generator}] {ctx.text}")

    print("== 4. the model's answers before any edit")
    facts = store.list_facts()
    answers = generate_greedy(loaded.model, loaded.tokenizer, [f.prompt for f in facts], max_new_tokens=8)
    knows = 0
    for fact, answer in zip(facts, answers):
        hit = answer.lower().startswith(fact.target.lower())
        knows += hit
        print(f"   {fact.prompt} -> {answer!r}  (new target: {fact.target}{', already' if hit else ''})")
    print(f"   the unedited model gives the new target for {knows}/{len(facts)} prompts")
    note(f"demo store: {db}")
    return 0


COMMANDS = {"demo": (cmd_demo, _configure_demo, "run the main job end to end on the default model")}
