"""``tiled-hydra-clean``: failed runs and checkpoint disk, listed and (when asked) removed."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import assert_one_line
from tiled_hydra.cli.clean import main


def outputs(root: Path) -> dict[str, Path]:
    """A finished run (results and a 1000-byte checkpoint), a shard job, a run that failed before any
    slot, one that trained a slot before it died, and a worker's own run dir inside a run."""
    runs = {name: root / "runs" / name for name in ("finished", "shard", "failed", "killed")}
    for run_dir in runs.values():
        (run_dir / ".hydra").mkdir(parents=True)
        (run_dir / ".hydra" / "config.yaml").write_text("seed: 0\n")
    (runs["finished"] / "results.json").write_text("{}")
    (runs["finished"] / "checkpoints").mkdir()
    (runs["finished"] / "checkpoints" / "slot_000.pt").write_bytes(b"\0" * 1000)
    (runs["finished"] / "checkpoints" / "slot_000.json").write_text("{}")
    (runs["shard"] / "shard.json").write_text("{}")
    (runs["failed"] / "tiled_hydra.log").write_text("error\n")
    (runs["killed"] / "checkpoints").mkdir()
    (runs["killed"] / "checkpoints" / "slot_000.pt").write_bytes(b"\0" * 10)
    worker = runs["finished"] / ".workers" / "shard_1"
    (worker / ".hydra").mkdir(parents=True)  # part of its run, never listed on its own
    return runs


def test_lists_failed_runs_and_the_checkpoint_disk_without_changing_anything(call, tmp_path):
    runs = outputs(tmp_path)
    ran = call(main, [f"root={tmp_path}"])
    assert ran.code == 0, ran.err
    assert f"{tmp_path}: 2 finished runs (0.0 MiB of slot checkpoints), 1 failed runs" in ran.out
    assert f"failed: {runs['failed']}" in ran.out and "killed" not in ran.out  # a trained slot: resumable
    assert "remove them with: tiled-hydra-clean remove=true" in ran.out
    assert all(run_dir.is_dir() for run_dir in runs.values())


def test_remove_deletes_only_the_failed_runs_and_checkpoints_only_the_finished_runs_slots(call, tmp_path):
    runs = outputs(tmp_path)
    assert call(main, [f"root={tmp_path}", "remove=true"]).code == 0
    assert not runs["failed"].exists() and runs["killed"].is_dir() and runs["finished"].is_dir()
    ran = call(main, [f"root={tmp_path}", "checkpoints=true"])
    assert ran.code == 0 and "deleted the checkpoints of 2 finished runs" in ran.out
    assert not (runs["finished"] / "checkpoints" / "slot_000.pt").exists()
    assert (runs["finished"] / "checkpoints" / "slot_000.json").exists() and (runs["finished"] / "results.json").exists()
    assert (runs["killed"] / "checkpoints" / "slot_000.pt").exists()  # not finished: its slot stays for the resume


@pytest.mark.parametrize("args, message", [
    (["root=NOPE"], "no such directory"),
    (["remove=maybe"], "remove='maybe': expected true or false"),
    (["checkpoints=1"], "checkpoints=1: expected true or false"),
    (["rm=true"], "rm"),
])
def test_usage_errors_are_one_line(call, tmp_path, args, message):
    args = [a.replace("NOPE", str(tmp_path / "nope")) for a in args]
    if not any(a.startswith("root=") for a in args):
        args.append(f"root={tmp_path}")
    ran = call(main, args)
    assert_one_line(ran.code, ran.err, message, expected_code=2)
    assert ran.err.startswith("tiled_hydra.clean: error:")
