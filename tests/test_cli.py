"""The `engram` command line: ingest exit codes and JSON, status, facts, clean errors."""
from __future__ import annotations

import json

from agent.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_ingest_json_and_exit_codes(tmp_path, capsys):
    db = f"sqlite:///{tmp_path / 's.sqlite'}"
    path = tmp_path / "f.jsonl"
    path.write_text('{"prompt": "The capital of Japan is", "target": "Nairobi"}\n{"prompt": 1}\n')
    code, out, _ = run(capsys, "ingest", str(path), "--db", db, "--json")
    payload = json.loads(out)
    assert code == 1
    assert {k: payload[k] for k in ("stored", "duplicates", "superseded", "rejected")} == \
        {"stored": 1, "duplicates": 0, "superseded": 0, "rejected": 1}
    assert payload["errors"][0]["line"] == 2
    path.write_text('{"prompt": "The capital of Japan is", "target": "Nairobi"}\n')
    code, out, _ = run(capsys, "ingest", str(path), "--db", db)
    assert code == 0 and "stored 0, duplicates 1, superseded 0, rejected 0" in out


def test_status_and_facts(tmp_path, capsys):
    db = f"sqlite:///{tmp_path / 's.sqlite'}"
    path = tmp_path / "f.jsonl"
    path.write_text('{"prompt": "The capital of Japan is", "target": "Nairobi"}\n')
    run(capsys, "ingest", str(path), "--db", db)
    code, out, _ = run(capsys, "status", "--db", db, "--json")
    status = json.loads(out)
    assert code == 0 and status["facts"] == {"active": 1, "superseded": 0, "deleted": 0}
    assert set(status) >= {"facts", "contexts", "edits", "gist_pool", "model", "model_fingerprint"}
    assert "device" not in status  # status loads no model
    code, out, _ = run(capsys, "facts", "show", "1", "--db", db, "--json")
    assert code == 0 and json.loads(out)["target"] == "Nairobi"


def test_user_mistakes_are_one_line(tmp_path, capsys):
    db = f"sqlite:///{tmp_path / 's.sqlite'}"
    code, _, err = run(capsys, "ingest", str(tmp_path / "missing.jsonl"), "--db", db)
    assert code == 2 and err.strip().startswith("engram: error: no such file")
    code, _, err = run(capsys, "facts", "show", "42", "--db", db)
    assert code == 2 and "no fact with id 42" in err and "Traceback" not in err
