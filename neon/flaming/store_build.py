"""Writing a FlamingMoE store (the library part of tools/build_flaming_store.py).

Entries from token-id documents: for every position i of a document (stride `stride`),

    key_i   = encoder(ids[i-n+1 .. i])            (the frozen n-gram encoder, -1 before the start)
    value_i = ids[i+1 .. i+M]                     (M continuation tokens, -1 past the end)

so a model whose context window ends at token t finds the entries of the same n-gram, whose
values are the tokens that followed it in the corpus. Vector values: one entry per record,
key = encoder(last n ids of the record's text), value = the record's vector.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Optional

import numpy as np
import torch

from neon.flaming.encoder import NgramEncoder
from neon.flaming.store import FORMAT, KEYS, META, VALUES, VERSION, content_hash


def token_entries(ids: list[int], n: int, width: int, stride: int = 1):
    """-> (windows [E, n] int64, values [E, width] int32) of one document."""
    ids = list(ids)
    pad = [-1] * (n - 1) + ids + [-1] * width
    wins, vals = [], []
    for i in range(0, len(ids) - 1, stride):  # positions with at least one continuation token
        wins.append(pad[i:i + n])
        vals.append(pad[i + n:i + n + width])
    return np.asarray(wins, dtype=np.int64).reshape(-1, n), np.asarray(vals, dtype=np.int32).reshape(-1, width)


def write_store(path: str, encoder_desc: dict, records: Iterable, values: str = "tokens",
                value_width: int = 1, stride: int = 1, progress: Optional[callable] = None,
                batch: int = 4096) -> dict:
    """records: token-id lists (values='tokens') or (ids, vector) pairs (values='vectors').
    Writes keys.f32, values.bin and meta.json under `path`; returns the meta."""
    os.makedirs(path, exist_ok=True)
    enc = NgramEncoder(encoder_desc)
    n = enc.n
    entries = 0
    with open(os.path.join(path, KEYS), "wb") as fk, open(os.path.join(path, VALUES), "wb") as fv:
        for rec in records:
            if values == "tokens":
                wins, vals = token_entries(rec, n, value_width, stride)
            else:
                ids, vec = rec
                win = ([-1] * n + list(ids))[-n:]
                wins = np.asarray([win], dtype=np.int64)
                vals = np.asarray([vec], dtype=np.float32).reshape(1, value_width)
            for s in range(0, len(wins), batch):
                keys = enc(torch.from_numpy(wins[s:s + batch])).numpy().astype(np.float32)
                fk.write(keys.tobytes())
                fv.write(np.ascontiguousarray(vals[s:s + batch]).tobytes())
            entries += len(wins)
            if progress is not None:
                progress(1)
    k = encoder_desc["key_dim"]
    meta = {"format": FORMAT, "version": VERSION, "entries": entries, "key_dim": k,
            "values": values, "value_width": value_width, "encoder": encoder_desc,
            "keys_bytes": entries * k * 4, "values_bytes": entries * value_width * 4}
    meta["content_sha256"] = content_hash(path)
    with open(os.path.join(path, META + ".tmp"), "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(os.path.join(path, META + ".tmp"), os.path.join(path, META))  # meta last: complete
    return meta
