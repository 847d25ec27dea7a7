"""The command line's flags: global flags in either order, --version, no model flags where no model
loads, no store created by a command that only reads, and every choice checked before a model loads."""
from __future__ import annotations

import json

import pytest

from agent.cli import main, parse_args


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def db(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 's.sqlite'}"
    path = tmp_path / "f.jsonl"
    path.write_text('{"prompt": "The capital of Japan is", "target": "Nairobi"}\n')
    assert run(capsys, "ingest", str(path), "--db", url)[0] == 0
    return url


def test_global_flags_go_before_or_after_the_subcommand(db, capsys):
    before = run(capsys, "--db", db, "--json", "status")
    after = run(capsys, "status", "--db", db, "--json")
    assert before[0] == after[0] == 0
    assert json.loads(before[1])["facts"]["active"] == json.loads(after[1])["facts"]["active"] == 1
    assert parse_args(["--model", "gemma3-270m", "ask", "hi"]).model == "gemma3-270m"
    assert parse_args(["ask", "hi", "--model", "gemma3-270m"]).model == "gemma3-270m"
    assert parse_args(["--device", "cpu", "edit"]).device == "cpu"


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("engram ")


@pytest.mark.parametrize("argv", [["status", "--model", "x"], ["--model", "x", "facts", "list"],
                                  ["--device", "cpu", "contexts", "1"], ["facts", "list", "--device", "cpu"]])
def test_commands_that_load_no_model_take_no_model_flags(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args(argv)
    flag = next(a for a in argv if a.startswith("--"))
    assert exit_.value.code == 2 and flag in capsys.readouterr().err
    assert not hasattr(parse_args(["status"]), "model") and not hasattr(parse_args(["facts", "list"]), "device")


@pytest.mark.parametrize("argv", [["facts", "list"], ["status"], ["facts", "show", "1"], ["contexts", "1"]])
def test_a_command_that_only_reads_creates_no_store(tmp_path, capsys, argv):
    path = tmp_path / "nothing-here.sqlite"
    code, _, err = run(capsys, *argv, "--db", f"sqlite:///{path}")
    assert code == 2 and "no Engram store" in err and "Traceback" not in err
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_unknown_choices_fail_before_any_model_loads(tmp_path, capsys, monkeypatch):
    import editors.model

    def no_model(*_args, **_kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(editors.model, "load_model", no_model)
    db = f"sqlite:///{tmp_path / 's.sqlite'}"
    code, _, err = run(capsys, "edit", "--method", "nonsense", "--db", db)
    assert code == 2 and "nonsense" in err
    with pytest.raises(SystemExit):
        parse_args(["eval", "--dataset", "x.json", "--out", str(tmp_path), "--contexts", "nonsense"])
    with pytest.raises(SystemExit):
        parse_args(["ingest", "f.jsonl", "--contexts", "nonsense"])


def test_ingest_and_eval_share_the_contexts_choices():
    for kind in ("none", "template", "local", "openai", "auto"):
        assert parse_args(["ingest", "f.jsonl", "--contexts", kind]).contexts == kind
        assert parse_args(["eval", "--dataset", "x.json", "--out", "o", "--contexts", kind]).contexts == kind


def test_an_unexpected_error_is_one_line_without_verbose(tmp_path, capsys, monkeypatch):
    from agent import commands

    def broken(_args):
        raise RuntimeError("boom")

    monkeypatch.setitem(commands.REGISTRY, "status", (broken, lambda p: None, "status"))
    code, _, err = run(capsys, "status", "--db", f"sqlite:///{tmp_path / 's.sqlite'}")
    assert code == 3 and "internal error: RuntimeError: boom" in err and "Traceback" not in err


def test_a_store_refuses_a_model_other_than_the_one_its_edits_belong_to(tmp_path, capsys):
    from editors.fingerprint import model_fingerprint
    from editors.model import tiny_llama, tiny_tokenizer
    from memory.store import FactStore

    def saved(seed: int):
        model, out = tiny_llama(seed=seed), tmp_path / f"tiny{seed}"
        model.save_pretrained(out)
        tiny_tokenizer().save_pretrained(out)
        return str(out), model_fingerprint(model, str(out))

    first, first_print = saved(0)
    other, other_print = saved(1)
    db = f"sqlite:///{tmp_path / 's.sqlite'}"
    store = FactStore(db)
    code, _, err = run(capsys, "edit", "--db", db, "--model", first, "--device", "cpu")  # a writer binds the model
    assert code == 0, err
    assert store.get_meta("model") == first and store.get_meta("model_fingerprint") == first_print
    code, _, err = run(capsys, "ask", "Hi", "--db", db, "--model", other, "--device", "cpu", "--max-new-tokens", "1")
    assert code == 2 and err.count("\n") == 1
    assert first in err and other in err and first_print in err and other_print in err
    code, _, err = run(capsys, "ask", "Hi", "--db", db, "--model", first, "--device", "cpu", "--max-new-tokens", "1")
    assert code == 0, err
