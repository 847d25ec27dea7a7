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
    empty = f"sqlite:///{tmp_path / 'empty.sqlite'}"
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
