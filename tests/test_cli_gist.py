"""The gist route end to end on the default model: `engram ingest --route gist`, then `engram ask` reads the
pool through the mention and relation gates (the shipped add-on, the packaged MiniLM)."""
from __future__ import annotations

import json

from agent.cli import main

FACT = {"prompt": "The mother tongue of Zorblax Quent is", "target": "French", "subject": "Zorblax Quent"}
# names the subject, asks something else (MiniLM cosine of the two relation texts: 0.35, under the 0.4 threshold)
OTHER_RELATION = "The number of employees of Zorblax Quent is"


def ask(capsys, db: str, prompt: str, *flags: str) -> str:
    code = main(["ask", prompt, "--db", db, "--json", *flags])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)["answer"]


def test_ingest_to_the_pool_then_ask(tmp_path, capsys):
    from memory.store import FactStore

    empty = f"sqlite:///{tmp_path / 'empty.sqlite'}"
    FactStore(empty)  # a store with no facts: `ask` answers with the base model (ask never creates a store)
    db = f"sqlite:///{tmp_path / 's.sqlite'}"
    path = tmp_path / "facts.jsonl"
    path.write_text(json.dumps(FACT) + "\n")
    code = main(["ingest", str(path), "--db", db, "--route", "gist", "--json"])
    payload = json.loads(capsys.readouterr()[0])
    assert code == 0 and payload["gist"]["added"] == 1 and payload["gist"]["pool"] == 1

    base = ask(capsys, empty, FACT["prompt"])
    read = ask(capsys, db, FACT["prompt"])
    assert "French" not in base and "French" in read  # the fact is read from its gist
    # another relation of the same subject: the relation gate keeps the gist unread, so the answer is the
    # base model's exactly (an unread pool leaves the logits bit-identical)
    base_other = ask(capsys, empty, OTHER_RELATION)
    assert ask(capsys, db, OTHER_RELATION) == base_other
    assert ask(capsys, db, OTHER_RELATION, "--no-relation-gate") != base_other  # the mention gate alone reads it


def test_the_answer_copy_finishes_a_made_up_name_the_gist_began(tmp_path, capsys):
    """A two-word made-up answer: the gist gives its first token, the stored answer tokens the rest."""
    fact = {"prompt": "The capital of Zorbia is", "target": "Quellmarsh Tavendor", "subject": "Zorbia"}
    db = f"sqlite:///{tmp_path / 's.sqlite'}"
    path = tmp_path / "facts.jsonl"
    path.write_text(json.dumps(fact) + "\n")
    assert main(["ingest", str(path), "--db", db, "--route", "gist", "--json"]) == 0
    capsys.readouterr()
    alone = ask(capsys, db, fact["prompt"], "--no-answer-copy")
    copied = ask(capsys, db, fact["prompt"])
    assert alone.startswith("Qu") and "Quellmarsh Tavendor" not in alone  # begun by the gist, not finished
    assert copied.startswith("Quellmarsh Tavendor")
