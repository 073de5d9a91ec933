"""Read what an offline wandb run logged, from its run-<id>.wandb transaction log.

wandb 0.31 keeps no Python reader for this file (its writer is the Go wandb-core), so this reads
the documented LevelDB log framing (7-byte ':W&B' header, 32 KiB blocks, records with a 7-byte
crc/length/type header split into FULL / FIRST / MIDDLE / LAST fragments) and decodes every
record with wandb's own protobuf classes (wandb.proto.wandb_internal_pb2.Record).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb transaction log"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < 7:  # block trailer padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:  # zero padding at the end of a block
            pos += left_in_block
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == FULL:
            pending = chunk
        elif kind == FIRST:
            pending = chunk
            continue
        elif kind == MIDDLE:
            pending += chunk
            continue
        elif kind == LAST:
            pending += chunk
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        pending = b""
        yield record


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def read_run(run_dir: Path) -> tuple[list[dict], dict]:
    """(history rows, config) of the single offline run under run_dir (searched recursively)."""
    logs = sorted(Path(run_dir).rglob("offline-run-*/run-*.wandb"))
    assert len(logs) == 1, f"expected one offline wandb run under {run_dir}, found {logs}"
    history, config = [], {}
    for record in records(logs[0]):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "config":
            config.update({_key(i): json.loads(i.value_json) for i in record.config.update})
        elif kind == "run":
            config.update({_key(i): json.loads(i.value_json) for i in record.run.config.update})
    return history, config
