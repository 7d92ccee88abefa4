"""Read a W&B offline run (``run-*.wandb``) without the network: config, summary and group.

The file is W&B's record log (a 7-byte ``:W&B`` header, then LevelDB-log framed protobuf
``Record`` messages in 32 KiB blocks).  wandb >= 0.19 no longer ships a Python reader, so
this small one lets tests and ``tiled_hydra.compare`` use offline runs directly.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

_HEADER = 7
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def iter_records(path: Path):
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    pos, pending = _HEADER, b""
    while pos + 7 <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < 7:  # block trailer padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        if kind == _FULL:
            pending = b""
            yield _parse(chunk)
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield _parse(pending + chunk)
            pending = b""


def _parse(payload: bytes):
    record = wandb_internal_pb2.Record()
    record.ParseFromString(payload)
    return record


def read_offline_run(run_dir: Path) -> dict:
    """{'id', 'group', 'config', 'summary'} of an ``offline-run-*`` directory (or its .wandb file)."""
    run_dir = Path(run_dir)
    files = [run_dir] if run_dir.suffix == ".wandb" else sorted(run_dir.glob("run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"no run-*.wandb file in {run_dir}")
    out: dict = {"id": None, "group": None, "config": {}, "summary": {}}
    for record in iter_records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["id"], out["group"] = record.run.run_id, record.run.run_group or None
            out["config"].update({i.key: json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind in ("summary", "history"):
            items = record.summary.update if kind == "summary" else record.history.item
            for item in items:
                key = item.key or "/".join(item.nested_key)
                if key and not key.startswith("_"):
                    out["summary"][key] = json.loads(item.value_json)
    return out
