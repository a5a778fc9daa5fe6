"""paramserver/snapshot.py: names <-> steps, recovery after a writer killed between its renames,
pruning by a keep-set, resolving a --snapshot-dir to its newest complete snapshot."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from paramserver import snapshot as snap
from paramserver.store import WeightStore


def _store_at(step: int) -> WeightStore:
    st = WeightStore(6, 2, seed=1)
    for s in range(step):
        st.push([s % 6], np.ones((1, 2), np.float32), s, 0.1)
    return st


def _write(path, step: int) -> None:
    _store_at(step).snapshot(str(path))


def _dead_pid() -> int:
    """The pid of a process that has exited (a killed writer's)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _leftover(tmp_path, target: str, step: int) -> str:
    """A complete snapshot of ``step`` renamed to ``target`` (what a killed writer leaves)."""
    _write(tmp_path / "scratch", step)
    os.rename(tmp_path / "scratch", target)
    return target


def test_names_round_trip():
    for step in (0, 7, 12345678, 99999999, 100000000, 123456789012):
        assert snap.run_snapshot_step(snap.run_snapshot_name(step)) == step
        assert snap.periodic_step(snap.periodic_name(step)) == step
    assert snap.run_snapshot_name(12) == "store_00000012" and snap.periodic_name(4) == "step-000000004"
    for name in ("store_12", "store_000000012", "store_0000001x", "store_00000012.tmp.7.1", "step-000000004",
                 "store_-0000001", "xstore_00000012", "store_\u0661\u0662\u0663\u0664\u0665\u0666\u0667\u0668"):
        assert snap.run_snapshot_step(name) is None, name
    for name in ("step-4", "step-0000000004", "store_00000004", "latest", "step-000000004.old.3"):
        assert snap.periodic_step(name) is None, name
    with pytest.raises(ValueError):
        snap.run_snapshot_name(-1)
    assert snap.shard_dir("/r/store_00000003", 0, 1) == "/r/store_00000003"
    assert snap.shard_dir("/r/store_00000003", 1, 3) == "/r/store_00000003/shard-001-of-003"
    assert [snap.shard_level(s) for s in (1, 2, 8)] == [0, 1, 1]
    with pytest.raises(ValueError):
        snap.shard_dir("/r/s", 3, 3)


@pytest.mark.parametrize("had_path", [True, False])
def test_a_writer_killed_between_its_renames_is_recovered(tmp_path, had_path):
    """Killed after ``path -> path.old.PID`` and before ``path.tmp.PID.TID -> path``: both complete
    siblings are left and ``path`` is gone; the newest comes back, every dead leftover is swept.
    A writer killed before it wrote its manifest leaves an incomplete .tmp: swept, ``path`` kept."""
    path = str(tmp_path / "snap")
    dead = _dead_pid()
    if had_path:
        _leftover(tmp_path, f"{path}.old.{dead}", 3)
    _leftover(tmp_path, f"{path}.tmp.{dead}.140000", 4)
    os.makedirs(f"{path}.tmp.{dead}.140001")                 # a second writer thread, no manifest yet
    assert snap.recover_snapshot(path)
    assert snap.read_manifest(path)["step"] == 4
    assert sorted(os.listdir(tmp_path)) == ["snap"]
    # killed while filling its .tmp: the complete snapshot at path stays, the partial one goes
    os.makedirs(f"{path}.tmp.{dead}.140002")
    np.save(f"{path}.tmp.{dead}.140002/W.npy", np.zeros((6, 2), np.float32))
    assert snap.recover_snapshot(path) and snap.read_manifest(path)["step"] == 4
    assert sorted(os.listdir(tmp_path)) == ["snap"]
    # a live writer's siblings (here: our parent's pid) are never touched
    live = f"{path}.tmp.{os.getppid()}.1"
    os.makedirs(live)
    assert snap.recover_snapshot(path) and os.path.isdir(live)


def test_writing_leaves_the_old_snapshot_when_the_writer_fails(tmp_path):
    path = str(tmp_path / "snap")
    _write(path, 2)
    with pytest.raises(OSError):
        with snap.writing(path) as tmp:
            raise OSError("disk full")
    assert not os.path.exists(tmp) and snap.read_manifest(path)["step"] == 2
    with pytest.raises(RuntimeError, match="without a manifest"):
        with snap.writing(path):
            pass
    assert sorted(os.listdir(tmp_path)) == ["snap"] and snap.read_manifest(path)["step"] == 2


def test_pruning_keeps_the_keep_set_and_the_newest_older_one(tmp_path):
    run = tmp_path / "run"
    for step in (1, 3, 5, 7, 9, 11):
        _write(run / snap.run_snapshot_name(step), 0)
    (run / snap.run_snapshot_name(4)).mkdir()                  # not a snapshot: never removed
    (run / "notes").mkdir()
    own = str(run / snap.run_snapshot_name(9))
    assert snap.prune_snapshots(own, {"store_00000003"}, keep_previous=True) == 3   # 1, 5 and the newer 11
    assert sorted(os.listdir(run)) == ["notes", "store_00000003", "store_00000004", "store_00000007", "store_00000009"]
    assert snap.prune_snapshots(own, {"store_00000003"}) == 1                      # without keep_previous: 7 too
    assert sorted(os.listdir(run)) == ["notes", "store_00000003", "store_00000004", "store_00000009"]
    # ordered by step, not by name: a 9-digit step is newer than any 8-digit one
    for step in (99999998, 99999999, 100000000):
        _write(run / snap.run_snapshot_name(step), 0)
    assert snap.prune_snapshots(str(run / "store_100000000"), set(), keep_previous=True) == 3   # 3, 9, 99999998
    assert sorted(os.listdir(run)) == ["notes", "store_00000004", "store_100000000", "store_99999999"]


def test_resolving_a_snapshot_dir_gives_its_newest_complete_snapshot(tmp_path):
    d = tmp_path / "snaps"
    for step in (2, 5):
        _write(d / snap.periodic_name(step), step)
    (d / snap.periodic_name(7)).mkdir()                        # incomplete: no manifest
    (d / "latest").write_text("step-000000007\n")              # names the incomplete one: ignored
    assert snap.resolve_snapshot(str(d)) == str(d / "step-000000005")
    (d / "latest").write_text("step-000000002\n")              # a complete one it names wins
    assert snap.resolve_snapshot(str(d)) == str(d / "step-000000002")
    # a writer killed between its renames left step 9 complete beside its path: recovered, newest
    (d / "latest").unlink()
    _leftover(tmp_path, str(d / f"step-000000009.tmp.{_dead_pid()}.1"), 9)
    got = snap.resolve_snapshot(str(d))
    assert got == str(d / "step-000000009") and snap.read_manifest(got)["step"] == 9
    assert snap.resolve_snapshot(got) == got                   # a snapshot resolves to itself
    with pytest.raises(FileNotFoundError, match="neither a snapshot"):
        snap.resolve_snapshot(str(tmp_path / "empty"))


def test_write_periodic_points_latest_and_keeps_the_newest(tmp_path):
    d = str(tmp_path / "snaps")
    for step in (1, 2, 3, 4):
        path = snap.write_periodic(d, step, _store_at(step).snapshot, keep=2)
        assert path == os.path.join(d, snap.periodic_name(step))
    assert sorted(os.listdir(d)) == ["latest", "step-000000003", "step-000000004"]
    assert snap.latest_snapshot(d) == os.path.join(d, "step-000000004")
