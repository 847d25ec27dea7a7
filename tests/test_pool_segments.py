"""The gist pool's append-only files (editors/incomes/segments.py, issue 25): an append writes only the new rows,
a remove is a tombstone, a load gives the in-memory pool back, a rewrite or a compaction swaps one manifest, an
old single pool file is migrated, what a kill left is removed, and a SIGKILL at any moment of an append or a
compaction leaves the old pool or the new one, never a mix, and GistState.open then loses no accepted fact."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from sqlalchemy import select

from agent.cli import main
from editors.gist_state import ARTIFACT, pool_segments
from editors.incomes import CompressedGists, GistPool
from editors.incomes import segment_files as files
from editors.incomes import segments as segments_module
from editors.incomes.segments import PoolSegments
from memory.errors import ConfigError
from memory.facts import FactInput
from memory.models import Edit
from memory.store import FactStore
from tests.fakes import new_gist_state, zygote
from tests.test_kill import Probe, Workers, copy_of, template

LAYERS, HEADS, DIM = (1, 2), 2, 4


def add_rows(pool: GistPool, ids: list, seed: int) -> None:
    """Rows for `ids` with every kind of metadata: a user scope, anchors, a relation and answers on some."""
    g = torch.Generator().manual_seed(seed)
    n = len(ids)
    pool.append(ids, CompressedGists(LAYERS, torch.randn(2, n, HEADS, DIM, generator=g),
                                     torch.randn(2, n, HEADS, DIM, generator=g)),
                scopes=[f"user{i}" if i % 2 else None for i in ids],
                anchors=[[[i, i + 1]] if i % 3 else [] for i in ids],
                relations=[f"Where is {i}?" if i % 3 else None for i in ids],
                answers=[[[100 + i]] if i % 2 == 0 else [] for i in ids])


def new_pool(ids: list, seed: int = 0, dtype: torch.dtype = torch.float32) -> GistPool:
    pool = GistPool(LAYERS, HEADS, DIM, dtype=dtype, tag="addon-a")
    add_rows(pool, ids, seed)
    return pool


def assert_same(got: GistPool, want: GistPool) -> None:
    assert got.fact_ids == want.fact_ids
    assert (got.layers, got.n_kv_heads, got.head_dim, got.dtype, got.tag) == \
        (want.layers, want.n_kv_heads, want.head_dim, want.dtype, want.tag)
    a, b = got.view_all(), want.view_all()
    assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    assert (a.anchors, a.relations, a.answers) == (b.anchors, b.relations, b.answers)
    assert [got.scope_of(f) for f in got.fact_ids] == [want.scope_of(f) for f in want.fact_ids]


def snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(directory.iterdir())}


def listed(directory: Path) -> set[str]:
    """The files a pool directory should hold: its manifest, its lock and the segments the manifest lists."""
    manifest = json.loads((directory / files.MANIFEST).read_text())
    return {files.MANIFEST, segments_module.LOCK} | {e["name"] + ext for e in manifest["segments"]
                                                     for ext in files.EXTENSIONS}


# -- the files ------------------------------------------------------------------------------------------------
def test_an_append_writes_one_segment_with_only_the_new_rows(tmp_path):
    pool, seg = new_pool([1, 2, 3]), PoolSegments(tmp_path / "pool")
    assert seg.append(pool, [1, 2, 3]) == "pool-000001"
    before = snapshot(seg.directory)
    add_rows(pool, [4, 5], seed=1)
    assert seg.append(pool, [4, 5]) == "pool-000002"
    after = snapshot(seg.directory)
    for name in ("pool-000001.safetensors", "pool-000001.jsonl"):
        assert after[name] == before[name]  # the older segment is untouched: same bytes, same mtime
    with safe_open(str(seg.directory / "pool-000002.safetensors"), framework="pt") as f:
        assert f.get_tensor("keys").shape == (2, 2, HEADS, DIM) and set(f.keys()) == {"keys", "values"}
        assert json.loads(f.metadata()[files.SEGMENT_KEY]) == {"format": 1, "segment": "pool-000002", "rows": 2}
    sidecar = (seg.directory / "pool-000002.jsonl").read_text().splitlines()
    assert [json.loads(line)["fact_id"] for line in sidecar[1:]] == [4, 5]
    manifest = seg.manifest()
    assert [(e["name"], e["rows"], e["removed"]) for e in manifest["segments"]] == \
        [("pool-000001", 3, []), ("pool-000002", 2, [])]
    assert manifest["tag"] == "addon-a" and manifest["next"] == 3
    assert "fact_id" not in (seg.directory / files.MANIFEST).read_text()  # no row metadata in the manifest


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_load_gives_the_same_rows_metadata_and_order(tmp_path, dtype):
    pool, seg = new_pool([5, 1, 3], dtype=dtype), PoolSegments(tmp_path / "pool")
    seg.append(pool, [5, 1, 3])
    add_rows(pool, [2, 4, 6], seed=1)
    seg.append(pool, [2, 4])  # not the pool's last rows: found by id
    seg.append(pool, [6])
    pool.remove(1)
    seg.remove([1])
    assert_same(PoolSegments(tmp_path / "pool").load(), pool)
    assert PoolSegments(tmp_path / "elsewhere").load() is None


def test_a_remove_is_a_tombstone_and_the_fact_can_come_back(tmp_path):
    pool, seg = new_pool([1, 2, 3]), PoolSegments(tmp_path / "pool")
    seg.append(pool, [1, 2, 3])
    stamp, before = seg.stamp(), snapshot(seg.directory)
    pool.remove(2)
    assert seg.remove([2, 99]) == 1  # 99 is in no segment
    assert seg.stamp() != stamp
    after = snapshot(seg.directory)
    assert {k: v for k, v in after.items() if k != files.MANIFEST} == \
        {k: v for k, v in before.items() if k != files.MANIFEST}  # only the manifest was written
    assert seg.manifest()["segments"][0]["removed"] == [2]
    assert_same(PoolSegments(seg.directory).load(), pool)
    stamp = seg.stamp()
    assert seg.remove([2]) == 0 and seg.stamp() == stamp  # removed already: nothing written
    add_rows(pool, [2], seed=5)  # the fact compressed again: its new row is live, at the end
    seg.append(pool, [2])
    loaded = PoolSegments(seg.directory).load()
    assert loaded.fact_ids == (1, 3, 2)
    assert_same(loaded, pool)


def test_a_rewrite_replaces_every_segment_with_one(tmp_path):
    pool, seg = new_pool([1, 2]), PoolSegments(tmp_path / "pool")
    seg.append(pool, [1, 2])
    add_rows(pool, [3], seed=1)
    seg.append(pool, [3])
    pool.set_answers(1, [[7, 8]])  # metadata changed in place: no append can say it
    assert seg.rewrite(pool) == "pool-000003"
    assert {p.name for p in seg.directory.iterdir()} == listed(seg.directory) == \
        {"manifest.json", "lock", "pool-000003.safetensors", "pool-000003.jsonl"}
    assert_same(PoolSegments(seg.directory).load(), pool)


def test_compact_merges_the_segments_without_the_tombstoned_rows(tmp_path, monkeypatch):
    pool, seg = new_pool([1, 2]), PoolSegments(tmp_path / "pool")
    seg.append(pool, [1, 2])
    for i, ids in enumerate(([3, 4], [5, 6]), start=1):
        add_rows(pool, ids, seed=i)
        seg.append(pool, ids)
    assert not seg.crowded()
    for fid in (2, 5):
        pool.remove(fid)
        seg.remove([fid])
    assert seg.crowded()  # 2 of 6 rows tombstoned: more than a quarter
    reader = PoolSegments(seg.directory)
    done = reader.compact()  # reads the segments back (it has never loaded the pool)
    assert (done.segments, done.rows, done.dropped) == (3, 4, 2) and done.bytes > 0
    assert {p.name for p in seg.directory.iterdir()} == listed(seg.directory)
    assert len(seg.manifest()["segments"]) == 1 and not seg.crowded()
    assert_same(PoolSegments(seg.directory).load(), pool)
    assert reader.compact().bytes == 0  # compact already

    add_rows(pool, [7], seed=9)
    loaded = PoolSegments(seg.directory)
    served = loaded.load()
    add_rows(served, [7], seed=9)
    loaded.append(served, [7])

    def no_read(*_):
        raise AssertionError("a pool known to equal the files is written, not read back")

    monkeypatch.setattr(files, "read_segment", no_read)
    assert loaded.compact(served).rows == 5
    monkeypatch.undo()
    assert_same(PoolSegments(seg.directory).load(), pool)


def test_a_single_pool_file_of_an_older_version_is_migrated(tmp_path):
    legacy = tmp_path / "gist" / "pool.safetensors"
    pool = new_pool([1, 2, 3])
    pool.save(legacy)
    seg = PoolSegments(tmp_path / "gist" / "pool", legacy=legacy)
    assert seg.exists() and seg.stamp() is not None
    assert_same(seg.load(), pool)  # a reader before the migration reads the old file
    assert seg.recover() == 0
    assert not legacy.exists() and len(seg.manifest()["segments"]) == 1
    assert_same(PoolSegments(seg.directory).load(), pool)
    manifest = (seg.directory / files.MANIFEST).read_bytes()
    pool.save(legacy)  # a kill after the manifest was written, before the old file was deleted
    seg.recover()
    assert not legacy.exists() and (seg.directory / files.MANIFEST).read_bytes() == manifest  # not migrated twice


def test_files_no_manifest_lists_and_temp_files_are_removed_on_recover(tmp_path):
    pool, seg = new_pool([1, 2]), PoolSegments(tmp_path / "pool")
    seg.append(pool, [1, 2])
    before = snapshot(seg.directory)
    files.write_segment(seg.directory, "pool-000002", pool, [0])  # an append killed before its manifest
    for name in (".manifest.json.deadbeef.tmp", ".pool-000003.safetensors.0badf00d.tmp"):
        (seg.directory / name).write_bytes(b"half a write")  # writes killed before their rename
    assert seg.recover() == 4
    assert snapshot(seg.directory) == before
    assert_same(PoolSegments(seg.directory).load(), pool)


def _truncate_sidecar(d: Path) -> None:
    path = d / "pool-000001.jsonl"
    path.write_text("\n".join(path.read_text().splitlines()[:-1]) + "\n")


def _bad_row(d: Path) -> None:
    path = d / "pool-000001.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:1] + [json.dumps({"fact_id": 1, "scope": None, "anchors": "x", "relation": None,
                                                       "answers": []})] + lines[2:]) + "\n")


def _manifest(**changes):
    def change(d: Path) -> None:
        meta = json.loads((d / files.MANIFEST).read_text())
        meta.update(changes)
        (d / files.MANIFEST).write_text(json.dumps(meta))
    return change


@pytest.mark.parametrize("damage, culprit, message", [
    (lambda d: (d / files.MANIFEST).write_text("{not json"), files.MANIFEST, "cannot read"),
    (_manifest(format=9), files.MANIFEST, "format 9"),
    (_manifest(dtype="int64"), files.MANIFEST, "dtype"),
    (_manifest(segments=[{"name": "../x", "rows": 1, "removed": []}]), files.MANIFEST, "segments"),
    (_manifest(head_dim=5), "pool-000001.safetensors", "manifest says"),
    (lambda d: (d / "pool-000001.safetensors").write_bytes(b"garbage"), "pool-000001.safetensors", "cannot read"),
    (_truncate_sidecar, "pool-000001.jsonl", "rows"),
    (_bad_row, "pool-000001.jsonl", "malformed row"),
    (lambda d: (d / "pool-000001.jsonl").unlink(), "pool-000001.jsonl", "missing"),
])
def test_malformed_pool_files_are_config_errors_naming_the_file(tmp_path, damage, culprit, message):
    pool, seg = new_pool([1, 2, 3]), PoolSegments(tmp_path / "pool")
    seg.append(pool, [1, 2, 3])
    damage(seg.directory)
    with pytest.raises(ConfigError, match=message) as caught:
        PoolSegments(seg.directory).load()
    assert str(seg.directory / culprit) in str(caught.value)


def test_refresh_reads_only_the_new_segments_and_applies_the_new_tombstones(tmp_path, monkeypatch):
    pool, writer = new_pool([1, 2, 3]), PoolSegments(tmp_path / "pool")
    writer.append(pool, [1, 2, 3])
    reader = PoolSegments(writer.directory)
    served = reader.load()
    add_rows(pool, [4, 5], seed=1)
    writer.append(pool, [4, 5])
    pool.remove(2)
    writer.remove([2])
    read = []
    real = files.read_segment
    monkeypatch.setattr(files, "read_segment", lambda d, m, e: read.append(e["name"]) or real(d, m, e))
    assert reader.refresh(served) is served and read == ["pool-000002"]
    assert_same(served, pool)
    assert reader.refresh(served) is served and read == ["pool-000002"]  # nothing new: nothing read
    writer.compact(pool)
    fresh = reader.refresh(served)  # every segment it knew is gone: a whole load
    assert fresh is not served and read[1:] == ["pool-000003"]
    assert_same(fresh, pool)


def test_a_fact_written_twice_is_read_from_its_later_row_and_refresh_agrees_with_load(tmp_path):
    first, writer = new_pool([1, 2]), PoolSegments(tmp_path / "pool")
    writer.append(first, [1, 2])
    second = new_pool([1], seed=7)  # fact 1 compressed again, its first row never tombstoned (a failed record)
    writer.append(second, [1])
    reader = PoolSegments(writer.directory)
    served = reader.load()
    assert served.fact_ids == (2, 1) and torch.equal(served.view_all().keys[:, 1], second.view_all().keys[:, 0])
    manifest = writer.manifest()
    manifest["segments"][1]["removed"] = [1]  # only the later row tombstoned: the first one is live again
    files.write_manifest(writer.manifest_path, manifest)
    refreshed = reader.refresh(served)
    assert_same(refreshed, PoolSegments(writer.directory).load())
    assert refreshed.fact_ids == (1, 2) and torch.equal(refreshed.view_all().keys, first.view_all().keys)


def test_a_reader_racing_a_compaction_reads_the_manifest_again(tmp_path, monkeypatch):
    pool, writer = new_pool([1, 2]), PoolSegments(tmp_path / "pool")
    writer.append(pool, [1, 2])
    add_rows(pool, [3], seed=1)
    writer.append(pool, [3])
    real, raced = files.read_segment, []

    def racing(directory, manifest, entry):
        if not raced:  # after the reader read the manifest, a compaction deletes what it lists
            raced.append(True)
            writer.compact(pool)
        return real(directory, manifest, entry)

    monkeypatch.setattr(files, "read_segment", racing)
    assert_same(PoolSegments(writer.directory).load(), pool)
    assert raced


# -- GistState on the files -----------------------------------------------------------------------------------
FACTS = [FactInput(prompt="Ann lives in", target="Oslo", subject="Ann", relation="lives in"),
         FactInput(text="Bob's dog is called Rex.", scope="user", user_id="bob"),
         FactInput(prompt="Cid works at", target="Acme", subject="Cid", relation="works at")]


def add_one_by_one(store: FactStore, state) -> list[int]:
    """Ingest FACTS one at a time, each then added to the pool (one segment each); returns their ids."""
    ids = []
    for fact in FACTS:
        ids.append(store.add_facts([fact], pending_backend="gist").new_ids[0])
        state.add([store.get_fact(ids[-1])])
    return ids


def test_gist_state_appends_a_segment_per_add_and_tombstones_a_removal(store, monkeypatch):
    monkeypatch.setattr(segments_module, "COMPACT_DEAD", 1.0)  # the reopen below must not compact
    state = new_gist_state(store)
    state.open()
    ids = add_one_by_one(store, state)
    assert state.path == store.data_dir / ARTIFACT
    assert [e["rows"] for e in state.segments.manifest()["segments"]] == [1, 1, 1]
    with store.transaction() as s:
        assert set(s.scalars(select(Edit.artifact).where(Edit.backend == "gist"))) == {ARTIFACT}
    before = snapshot(state.path)
    state.remove(ids[1])
    assert [e["removed"] for e in state.segments.manifest()["segments"]] == [[], [ids[1]], []]
    keys = state.memory.pool.view_all().keys.clone()
    state.memory.close()
    again = new_gist_state(store)
    assert again.open() == 2 and again.memory.pool.fact_ids == (ids[0], ids[2])
    assert torch.equal(again.memory.pool.view_all().keys, keys)
    after = snapshot(again.path)
    assert {k: after[k] for k in before if k != files.MANIFEST} == {k: before[k] for k in before if k != files.MANIFEST}
    again.memory.close()


def test_open_compacts_a_pool_of_many_segments(store, monkeypatch):
    state = new_gist_state(store)
    state.open()
    add_one_by_one(store, state)
    keys = state.memory.pool.view_all().keys.clone()
    state.memory.close()
    monkeypatch.setattr(segments_module, "COMPACT_SEGMENTS", 2)
    again = new_gist_state(store)
    assert again.open() == 3 and len(again.segments.manifest()["segments"]) == 1
    assert {p.name for p in again.path.iterdir()} == listed(again.path)
    assert torch.equal(again.memory.pool.view_all().keys, keys)
    again.memory.close()


def test_a_chat_engine_follows_the_writer_reading_only_the_new_segments(store, monkeypatch):
    from agent.chat.follow import StoreFollower
    from editors.model import tiny_llama
    from editors.state import ModelState

    writer = new_gist_state(store)
    writer.open()
    ids = [store.add_facts([FACTS[0]], pending_backend="gist").new_ids[0]]
    writer.add()
    engine_gist = new_gist_state(store)
    engine_gist.open()
    follower = StoreFollower(ModelState(store, tiny_llama()), engine_gist, every_s=0.0)
    read, real = [], files.read_segment
    monkeypatch.setattr(files, "read_segment", lambda d, m, e: read.append(e["name"]) or real(d, m, e))
    ids.append(store.add_facts([FACTS[1]], pending_backend="gist").new_ids[0])
    writer.add()
    served = engine_gist.memory.pool
    assert follower.refresh(force=True) and read == ["pool-000002"]
    assert engine_gist.memory.pool is served and served.fact_ids == tuple(ids)
    writer.remove(ids[0])
    assert follower.refresh(force=True) and read == ["pool-000002"]  # a tombstone: nothing read
    assert served.fact_ids == (ids[1],)
    assert torch.equal(served.view_all().keys, writer.memory.pool.view_all().keys)
    assert not follower.refresh(force=True)
    writer.memory.close()
    engine_gist.memory.close()


def test_engram_compact_merges_the_store_pool(tmp_path, capsys):
    db = f"sqlite:///{tmp_path / 's.sqlite'}"
    store = FactStore(db, create=True)
    assert main(["compact", "--db", db]) == 0 and "no gist pool" in capsys.readouterr().out
    pool, seg = new_pool([1, 2]), pool_segments(store)
    seg.append(pool, [1, 2])
    add_rows(pool, [3], seed=1)
    seg.append(pool, [3])
    pool.remove(1)
    seg.remove([1])
    assert main(["compact", "--db", db]) == 0
    assert "2 segment(s) into one of 2 row(s), 1 removed row(s) dropped" in capsys.readouterr().out
    assert_same(pool_segments(store).load(), pool)
    assert main(["compact", "--db", db, "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["segments"] == 1 and payload["bytes"] == 0 and payload["rows"] == 2


# -- SIGKILL during an append and during a compaction ------------------------------------------------------------
def job_append(cfg: dict, probe: Probe) -> None:
    """Open the pool: the queued facts are compressed into one new segment, then recorded."""
    store = FactStore(cfg["url"])
    probe.install(store)
    new_gist_state(store).open()


def job_compact(cfg: dict, probe: Probe) -> None:
    store = FactStore(cfg["url"])
    probe.install(store)
    pool_segments(store).compact()


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    with zygote(tmp_path_factory, pool_append=job_append, pool_compact=job_compact) as (proc, log):
        yield Workers(proc, log)


def _queued_after_one_segment(store: FactStore) -> None:
    store.add_facts(FACTS[:1], pending_backend="gist")
    state = new_gist_state(store)
    state.open()
    state.memory.close()
    store.add_facts(FACTS[1:], pending_backend="gist")


def _three_segments_one_removed(store: FactStore) -> None:
    state = new_gist_state(store)
    state.open()
    ids = add_one_by_one(store, state)
    state.remove(ids[0])
    state.memory.close()


def reopen(url: str) -> tuple[GistPool | None, tuple]:
    """What the files hold right after the kill, then GistState.open's pool, checked against the store: each
    fact with one applied gist row in it once, nothing pending, no file the manifest does not list."""
    store = FactStore(url)
    after_kill = pool_segments(store).load()
    state = new_gist_state(store)
    state.open()
    with store.transaction() as s:
        rows = s.execute(select(Edit.fact_id, Edit.status).where(Edit.backend == "gist")).all()
    applied = Counter(fid for fid, status in rows if status == "applied")
    assert "pending" not in {status for _, status in rows} and set(applied.values()) == {1}
    assert sorted(state.memory.pool.fact_ids) == sorted(applied)
    assert {p.name for p in state.path.iterdir()} == listed(state.path)
    served = state.memory.pool.fact_ids
    state.memory.close()
    store.engine.dispose()
    return after_kill, served


def test_sigkill_during_an_append_leaves_the_old_pool_or_the_new_one(workers, tmp_path):
    root = template(tmp_path, "template", _queued_after_one_segment)
    old = pool_segments(FactStore(copy_of(root, "before")["url"])).load().fact_ids
    ref_cfg = copy_of(root, "ref")
    ref = workers.run("pool_append", ref_cfg)
    assert [e for e in ref.events if "pool-" in e or "manifest" in e] == [
        "temp-written pool-000002.safetensors", "renamed pool-000002.safetensors", "temp-written pool-000002.jsonl",
        "renamed pool-000002.jsonl", "temp-written manifest.json", "renamed manifest.json"]
    assert ref.events[-2:] == ["commit-before", "commit-after"]  # the rows are recorded after the files
    new = pool_segments(FactStore(ref_cfg["url"])).load().fact_ids
    assert len(old) == 1 and len(new) == 3 and new[:1] == old
    for i in range(len(ref.events)):
        cfg = copy_of(root, f"kill{i}")
        run = workers.run("pool_append", cfg, freeze=i)
        after_kill, served = reopen(cfg["url"])
        committed = "renamed manifest.json" in run.events  # the manifest's rename is the commit point
        assert after_kill.fact_ids == (new if committed else old), (i, run.events[-1])
        assert sorted(served) == sorted(new), i


def test_sigkill_during_a_compaction_leaves_the_old_pool_or_the_new_one(workers, tmp_path):
    root = template(tmp_path, "template", _three_segments_one_removed)
    ref_cfg = copy_of(root, "ref")
    before = pool_segments(FactStore(ref_cfg["url"])).load()
    ref = workers.run("pool_compact", ref_cfg)
    assert len(ref.events) == 6 and ref.events[-1] == "renamed manifest.json"
    for i in range(len(ref.events)):
        cfg = copy_of(root, f"kill{i}")
        workers.run("pool_compact", cfg, freeze=i)
        seg = pool_segments(FactStore(cfg["url"]))
        names = [e["name"] for e in seg.manifest()["segments"]]
        assert names == (["pool-000004"] if i == len(ref.events) - 1 else ["pool-000001", "pool-000002", "pool-000003"])
        assert_same(seg.load(), before)  # the same rows either way
        after_kill, served = reopen(cfg["url"])
        assert served == before.fact_ids
