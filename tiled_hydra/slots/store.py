"""Where trained slots live: one checkpoint and one record per slot, a lock while one is trained.

``CHECKPOINT_DIR/slot_NNN.pt`` holds the slot's own weights (never the shared backbone) and the
fingerprint of the settings that made them; ``slot_NNN.json`` its record (seconds, peak memory,
losses, size, checksum, where and when it was trained); ``slot_NNN.lock`` is held while it trains,
so shards sharing a directory never train one slot twice. Both files are written atomically and
the record last, so a slot counts as trained only once both are complete. Slots are numbered
from 0 everywhere: file names, records, logs and shard.json.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch

from tiled_hydra.core.calibration import SlotCalibration
from tiled_hydra.errors import DataError
from tiled_hydra.rundir import PidLock, check_slot_records, fingerprint_of, mismatch_error, temp_path, write_json_atomic

log = logging.getLogger("tiled_hydra")


def slot_name(slot: int) -> str:
    return f"slot_{slot:03d}"


def slot_tiles(num_tiles: int, shared: bool) -> list[list[int]]:
    """Tile indices served by each slot: all tiles in one slot, or one slot per tile."""
    tiles = list(range(num_tiles))
    return [tiles] if shared else [[t] for t in tiles]


def shard_slots(num_slots: int, shard: int | None, num_shards: int) -> list[int]:
    """The slots one shard trains: slot k belongs to shard k mod num_shards (interleaved, so slots of
    unequal cost, e.g. border tiles, spread evenly); every slot when no shard is chosen."""
    slots = range(num_slots)
    return list(slots) if shard is None else [k for k in slots if k % num_shards == shard]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


class SlotLock(PidLock):
    """slot_NNN.lock next to the slot's checkpoint: waits (saying so) while another process trains it."""

    def __init__(self, path: Path):
        def wait(pid: str) -> None:
            log.info("%s: another process (pid %s) is training this slot; waiting for it", path.with_suffix(".pt").name, pid)

        super().__init__(path, wait)


class SlotStore:
    """The checkpoints and records of one run's slots (see module doc).

    ``identity``: every setting that changes a slot's weights; its fingerprint is stamped on each
    checkpoint and record, and slots of another identity are refused. ``new_model(slot)`` builds an
    untrained model to load a checkpoint into.
    """

    def __init__(self, directory: Path, identity: dict, tiles: list[list[int]], new_model: Callable[[int], torch.nn.Module]):
        self.directory = Path(directory)
        self.identity = identity
        self.fingerprint = fingerprint_of(identity)
        self.tiles = tiles
        self.new_model = new_model
        self.directory.mkdir(parents=True, exist_ok=True)
        check_slot_records(self.directory, identity)

    def __len__(self) -> int:
        return len(self.tiles)

    def checkpoint_path(self, slot: int) -> Path:
        return self.directory / f"{slot_name(slot)}.pt"

    def record_path(self, slot: int) -> Path:
        return self.directory / f"{slot_name(slot)}.json"

    def lock(self, slot: int) -> SlotLock:
        return SlotLock(self.directory / f"{slot_name(slot)}.lock")

    def read_record(self, slot: int) -> dict | None:
        try:
            return json.loads(self.record_path(slot).read_text())
        except FileNotFoundError:
            return None
        except ValueError:
            return None  # a damaged record: the slot is trained again (its checkpoint is moved aside)

    def records(self) -> list[dict]:
        """Every readable slot record, in slot order."""
        return [r for r in (self.read_record(slot) for slot in range(len(self))) if r is not None]

    def save(self, slot: int, model, record: dict, calibration: SlotCalibration | None = None) -> dict:
        """Checkpoint (the slot's weights and its calibration statistics), then its record (with size and
        checksum): both atomic."""
        path = self.checkpoint_path(slot)
        tmp = temp_path(path)  # unique: two processes never share a temporary file
        payload = {"fingerprint": self.fingerprint, "tiles": self.tiles[slot], "state": model.slot_state_dict()}
        if calibration is not None:
            payload["calibration"] = calibration.state()
            record = {**record, "calibration": calibration.summary()}
        try:
            torch.save(payload, tmp)
            record |= {"checkpoint_bytes": tmp.stat().st_size, "sha256": file_sha256(tmp)}
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        record = {"fingerprint": self.fingerprint, "slot": slot, "tiles": self.tiles[slot], **record, "identity": self.identity}
        write_json_atomic(self.record_path(slot), record)
        return record

    def load(self, slot: int):
        """The trained model of ``slot`` in eval mode, its tensors memory-mapped from the checkpoint."""
        path = self.checkpoint_path(slot)
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise DataError(f"{path} cannot be read ({reason}); delete it to retrain that slot") from None
        if payload.get("fingerprint") != self.fingerprint:
            raise mismatch_error(path, self.directory.parent, None, self.identity)
        model = self.new_model(slot)
        model.load_slot_state_dict(payload["state"])
        model.calibration = SlotCalibration.from_state(payload["calibration"]) if "calibration" in payload else None
        return model.eval()

    def trained_record(self, slot: int) -> dict | None:
        """The record of a slot trained earlier whose checkpoint is intact, else None.

        A checkpoint whose size or checksum differs from its record (truncated, overwritten)
        is moved aside with a warning and the slot is trained again.
        """
        path, record = self.checkpoint_path(slot), self.read_record(slot)
        if record is None or record.get("fingerprint") != self.fingerprint or not path.exists():
            return None
        if path.stat().st_size != record.get("checkpoint_bytes") or file_sha256(path) != record.get("sha256"):
            aside = path.with_name(path.name + ".damaged")
            os.replace(path, aside)
            log.warning("%s is damaged (size or checksum differ from %s); moved to %s, training that slot again",
                        path, self.record_path(slot).name, aside.name)
            return None
        return record

    def missing(self) -> list[int]:
        """Slots without a record and checkpoint of this configuration (a quick look: the checksum
        is verified when a slot is used, by :meth:`trained_record`)."""
        return [slot for slot in range(len(self))
                if (self.read_record(slot) or {}).get("fingerprint") != self.fingerprint or not self.checkpoint_path(slot).exists()]

    def weight_bytes(self) -> int:
        """Bytes of every slot's own weights (what ``inference.mode=resident`` keeps on the device)."""
        total = 0
        for slot in range(len(self)):
            path = self.checkpoint_path(slot)
            if path.exists():
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["state"]  # mmap: sizes only
                total += sum(t.numel() * t.element_size() for t in state.values())
        return total

    def delete_checkpoints(self) -> int:
        """Remove the slot checkpoints (keep_checkpoints=false); the records stay. Returns the bytes freed."""
        freed = 0
        for slot in range(len(self)):
            path = self.checkpoint_path(slot)
            if path.exists():
                freed += path.stat().st_size
                path.unlink()
        return freed


def busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end] intervals: time during which at least one slot trained
    (parallel shards overlap; the pause between a kill and a resume is not counted)."""
    total, end = 0.0, None
    for start, stop in sorted(intervals):
        if end is None or start > end:
            total += stop - start
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total


def training_summary(records: list[dict]) -> dict:
    """Run-level training costs from the slot records: every slot counts, resumed or not, whichever
    shard trained it. ``train_seconds`` sums the slots' own times; ``train_wall_seconds`` is the time
    during which at least one slot was training (:func:`busy_seconds`)."""
    timed = [(r["started"], r["finished"]) for r in records if "started" in r and "finished" in r]
    return {
        "train_seconds": round(sum(r["seconds"] for r in records), 3),
        "train_wall_seconds": round(busy_seconds(timed), 3) if timed else None,
        "train_peak_mem_bytes": max(int(r["peak_mem_bytes"]) for r in records),
        "resumed_slots": sum(bool(r.get("resumed")) for r in records),
        "checkpoint_bytes": sum(int(r["checkpoint_bytes"]) for r in records),
        "checkpoint_bytes_per_slot": max(int(r["checkpoint_bytes"]) for r in records),
        "train_shards": len({r.get("shard") for r in records}),
    }
