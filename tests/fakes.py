"""What several test files share: the deterministic fake weight editors, a fresh tiny gist state, a tiny
saved model, and the worker side of the kill tests (the writer's start, a slowed and probed gist
compression, a quiet `engram run`, and tests/test_kill.py's zygote with extra jobs).

Tiny config-built models throughout: tiny_llama is seeded, so every process gets the same base model.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from editors.base import EditRequest, EditResult, finalize_delta, snapshot
from editors.model import tiny_llama, tiny_tokenizer
from editors.state import ModelState
from memory.facts import FactInput
from memory.store import FactStore

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"]
LAST_MLP = ["model.layers.3.mlp.down_proj.weight"]  # after every gist key/value: the pool does not see it


# -- the fake weight editors ---------------------------------------------------------------------------------
class StubEditor:
    """A stand-in editor's plumbing: it edits the matrices `names`, and has no rollback and no state."""

    name = "stub"

    def __init__(self, model, names=NAMES):
        self.model, self.names = model, list(names)

    def parameter_names(self):
        return list(self.names)

    def edit(self, request: EditRequest) -> EditResult:
        raise NotImplementedError

    def rollback(self, delta):
        raise NotImplementedError

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def scale(params: list[torch.Tensor], target: str) -> None:
    """w *= 1 + eps * noise(target), in place, for each of `params` in turn (one noise stream)."""
    gen = torch.Generator().manual_seed(sum(map(ord, target)))
    with torch.no_grad():
        for param in params:
            param.mul_(1 + 1e-2 * torch.randn(param.shape, generator=gen))


class ScaleEditor(StubEditor):
    """`scale` on the matrices `names`: deterministic given the weights it starts from and the fact, and
    dependent on those weights, like a real editor (so re-editing on the model without an edit differs from
    replaying a recorded delta). `calls`: the targets it was asked to edit, in order.

    Targets in `fail` fail (ok=False, nothing changed); `during(request)` runs inside every edit; each edit
    takes `sleep_s` (so kills can land in it); `probe` is told its start and end; the `kill_on_call`-th call
    raises KeyboardInterrupt with the weights already changed (the process is killed mid-edit)."""

    name = "scale"

    def __init__(self, model, names=NAMES, *, fail=(), during=None, sleep_s: float = 0.0, probe=None,
                 kill_on_call: int | None = None):
        super().__init__(model, names)
        self.fail, self.during, self.sleep_s, self.probe = set(fail), during, sleep_s, probe
        self.kill_on_call = kill_on_call
        self.calls: list[str] = []

    def edit(self, request: EditRequest) -> EditResult:
        if self.probe:
            self.probe(f"edit-start {request.target}")
        self.calls.append(request.target)
        if self.during:
            self.during(request)
        time.sleep(self.sleep_s)
        before = snapshot(self.model, self.names)
        if request.target in self.fail:
            return EditResult(steps=1, loss=9.0, seconds=0.0, delta={}, ok=False, error="did not learn it")
        params = dict(self.model.named_parameters())
        scale([params[name] for name in self.names], request.target)
        if len(self.calls) == self.kill_on_call:
            raise KeyboardInterrupt  # the process is killed mid-edit
        delta = finalize_delta(self.model, before)
        if self.probe:
            self.probe(f"edit-done {request.target}")
        return EditResult(steps=1, loss=0.5, seconds=self.sleep_s, delta=delta)


class FakeEditor(ScaleEditor):
    """The agent loop's fake weight editor: ScaleEditor on the last layer's MLP (LAST_MLP) only, which no
    gist key or value depends on."""

    name = "fake"

    def __init__(self, model, **options):
        super().__init__(model, LAST_MLP, **options)


# -- small helpers ------------------------------------------------------------------------------------------
def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def add_targets(store: FactStore, *targets: str) -> list[int]:
    """Store one fact "Fact {target} is" -> target for each target; returns the new ids."""
    return store.add_facts([FactInput(prompt=f"Fact {t} is", target=t) for t in targets]).new_ids


def new_gist_state(store: FactStore):
    """A GistState over a fresh tiny gist add-on: the same base model and add-on in every process."""
    from editors.gist_state import GistState
    from editors.incomes import GistAddon, GistConfig
    from editors.incomes.memory import GistMemory

    model = tiny_llama()
    return GistState(store, GistMemory(model, tiny_tokenizer(), GistAddon.for_model(model, GistConfig())))


def save_tiny_model(directory: Path) -> tuple[Path, Path]:
    """A tiny model and its tokenizer saved in directory/model, a fresh gist add-on in directory/addon."""
    from editors.incomes import GistAddon, GistConfig

    model = tiny_llama()
    model.save_pretrained(directory / "model")
    tiny_tokenizer().save_pretrained(directory / "model")
    GistAddon.for_model(model, GistConfig()).save(directory / "addon")
    return directory / "model", directory / "addon"


# -- the worker side of the kill tests ----------------------------------------------------------------------
def writer_state(url: str, probe=None) -> tuple[FactStore, ModelState]:
    """What a writer (`engram edit`, `rollback`, `run`) does first: the store (its commits and file writes
    probed, with a `probe`), the writer lock, the rebuilt live model."""
    store = FactStore(url)
    if probe is not None:
        probe.install(store)
    state = ModelState(store, tiny_llama())
    state.acquire_writer()
    state.rebuild()
    return store, state


def slow_compression(gist, probe, sleep_s: float):
    """`gist` with its compression slowed by `sleep_s` (so kills can land in it) and its start and end
    reported to `probe`."""
    compress = gist.memory.add

    def slow_compress(fact_ids, *args, **kwargs):
        probe(f"compress-start {len(fact_ids)}")
        time.sleep(sleep_s)
        compress(fact_ids, *args, **kwargs)
        probe("compress-done")

    gist.memory.add = slow_compress
    return gist


def run_quiet_loop(store: FactStore, state: ModelState, file: str, config, **backends) -> None:
    """`engram run --source FILE` with `config` (a LoopConfig) and template contexts, its view silenced;
    `backends`: the rest of the loop's Backends (editor, router, open_gist, ...). Closes `state` after."""
    from agent.contexts import TemplateContextGenerator
    from agent.loop.loop import AgentLoop, Backends
    from agent.loop.sources import FileSource, Offsets
    from agent.loop.view import LogView
    from memory.stages import read_offset

    offsets = Offsets(lambda key: read_offset(store, key))
    backends = Backends(state, generator=TemplateContextGenerator(), **backends)
    with open(os.devnull, "w") as quiet:
        source = FileSource(Path(file), offsets, "facts.jsonl")
        AgentLoop(store, [source], backends, LogView(quiet, quiet), config, offsets).run()
    state.close()


@contextmanager
def zygote(tmp_path_factory, **jobs):
    """tests/test_kill.py's zygote process, with `jobs` (name -> a module-level worker function) added to
    its JOBS: yields (the process, its stderr log) for a tests.test_kill.Workers, and stops it after."""
    log = tmp_path_factory.mktemp("zygote") / "stderr"
    boot = ["import tests.test_kill as k"]
    boot += [f"import {job.__module__} as m; k.JOBS[{name!r}] = m.{job.__name__}" for name, job in jobs.items()]
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", "; ".join(boot + ["k._zygote()"])], cwd=ROOT,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        yield proc, log
    finally:
        proc.stdin.close()  # its loop ends; every worker was reaped already
        proc.terminate()
        proc.wait(timeout=30)
