"""The slot store (slots/store.py) on a copy of a finished ENS4 run's checkpoints: records, the quick
look at what is missing, checksums, sizes, deletion; nothing is trained here."""

from __future__ import annotations

import json

import pytest
import torch

from tiled_hydra.build import build_run
from tiled_hydra.errors import ConfigError
from tiled_hydra.slots.store import slot_name, slot_tiles


@pytest.fixture
def store(trained_run, tmp_path):
    cached = trained_run("padim", "ens4")
    checkpoints = cached.copy(tmp_path / "run") / "checkpoints"
    return build_run(cached.cfg, checkpoints).store


def test_slots_serve_all_tiles_or_one_tile_each():
    assert slot_tiles(4, shared=True) == [[0, 1, 2, 3]]
    assert slot_tiles(4, shared=False) == [[0], [1], [2], [3]]
    assert slot_name(7) == "slot_007"


def test_records_and_checkpoints_of_a_finished_run(store):
    assert len(store) == 4 and store.missing() == []
    records = store.records()
    assert [r["slot"] for r in records] == [0, 1, 2, 3] and [r["tiles"] for r in records] == [[0], [1], [2], [3]]
    for slot, record in enumerate(records):
        assert record["fingerprint"] == store.fingerprint and store.checkpoint_path(slot).stat().st_size == record["checkpoint_bytes"]
        assert store.trained_record(slot) == record  # size and checksum verified
        payload = torch.load(store.checkpoint_path(slot), weights_only=True)
        assert payload["fingerprint"] == store.fingerprint and payload["tiles"] == [slot]
    # the slots' own weights, never the shared backbone
    state_bytes = sum(t.numel() * t.element_size() for slot in range(4)
                      for t in torch.load(store.checkpoint_path(slot), weights_only=True)["state"].values())
    assert store.weight_bytes() == state_bytes > 0
    model = store.load(2)
    assert not model.training and not any(k.startswith("backbone.") for k in model.slot_state_dict())


def test_what_is_missing(store):
    store.checkpoint_path(1).unlink()  # a record without its checkpoint
    store.record_path(3).write_text("{ not json")  # a damaged record: trained again
    assert store.missing() == [1, 3]
    assert store.trained_record(1) is None and store.read_record(3) is None
    assert [r["slot"] for r in store.records()] == [0, 1, 2]


def test_delete_checkpoints_keeps_the_records(store):
    sizes = sum(store.checkpoint_path(s).stat().st_size for s in range(4))
    assert store.delete_checkpoints() == sizes
    assert not list(store.directory.glob("*.pt")) and len(store.records()) == 4
    assert store.missing() == [0, 1, 2, 3] and store.weight_bytes() == 0


def test_a_record_of_another_configuration_is_refused(trained_run, tmp_path):
    cached = trained_run("padim", "ens4")
    checkpoints = cached.copy(tmp_path / "run") / "checkpoints"
    record = json.loads((checkpoints / "slot_000.json").read_text())
    (checkpoints / "slot_000.json").write_text(json.dumps({**record, "fingerprint": "another"}))
    with pytest.raises(ConfigError, match="slot_000.json belongs to another configuration"):
        build_run(cached.cfg, checkpoints)
