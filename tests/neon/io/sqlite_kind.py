"""`sqlite`: a read-only SQLite table as an IO kind, in one file of its own (no other file of
Neon knows it; tests/neon/io/test_a_kind_in_one_file.py registers it and takes it through
training, checkpoints, resume and the Hugging Face export).

    "name=next,kind=sqlite,source=/data/bigrams.db,table=bigrams"

The table maps the token's last two ids to one id: (key INTEGER PRIMARY KEY, value INTEGER), key =
id_{t-1} * vocab_size + id_t. Per routed token t:

    v_t = value(key_t) if the table holds key_t, else none
    f(x_t, c_t) = W_out Emb[v_t]               (none: W_out 0)

Like any kind it imports only torch, the standard library, neon.errors and neon.io.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from dataclasses import dataclass

import torch

from neon.errors import IOSourceError
from neon.io.base import IOFunction, IOKind, context_ids


@dataclass(frozen=True)
class SQLiteOptions:
    table: str = "bigrams"
    embed_dim: int = 0


def connect(path: str, table: str, where: str) -> sqlite3.Connection:
    if not os.path.isfile(path):
        raise IOSourceError(f"{where}: {path!r} does not exist. Fix: give the SQLite file as source=.")
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
    if db.execute("SELECT name FROM sqlite_master WHERE type='table' AND name=?", (table,)).fetchone() is None:
        raise IOSourceError(f"{where}: {path!r} has no table {table!r}. Fix: name its table with table=.")
    return db


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class SQLiteFunction(IOFunction):
    def __init__(self, spec, settings):
        super().__init__(spec, settings)
        self.db = connect(spec.source, spec.options.table, spec.where())
        self.embed_dim = spec.options.embed_dim or settings.hidden_size
        self.embedding = torch.nn.Embedding(settings.vocab_size, self.embed_dim)
        torch.nn.init.normal_(self.embedding.weight, std=settings.init_std)
        self.build_out(self.embed_dim)

    def lookup(self, keys: list[int]) -> dict[int, int]:
        found = {}
        for start in range(0, len(keys), 500):  # SQLite's bound-parameter limit
            chunk = keys[start:start + 500]
            marks = ",".join("?" * len(chunk))
            query = f"SELECT key, value FROM {self.spec.options.table} WHERE key IN ({marks})"  # noqa: S608
            found.update(self.db.execute(query, chunk).fetchall())
        return found

    def read(self, x, context, extra):
        ids = context_ids(context, self.settings.context_window)[:, -2:].cpu()  # [T, 2]: id_{t-1}, id_t
        keys = [int(a) * self.settings.vocab_size + int(b) if a >= 0 else -1 for a, b in ids.tolist()]
        found = self.lookup(sorted({k for k in keys if k >= 0}))
        values = torch.tensor([found.get(k, -1) for k in keys], dtype=torch.long, device=x.device)
        return self.embedding(values.clamp(min=0)) * (values >= 0).unsqueeze(-1)  # [T, e]

    def source_identity(self):
        return {**super().source_identity(), "sha256": file_sha256(self.spec.source)}

    def check_source(self, recorded):
        if recorded.get("sha256") != file_sha256(self.spec.source) and not self.settings.source_swap:
            raise IOSourceError(f"{self.spec.where()}: the table file differs from the one the model was trained "
                                "with. Fix: attach that file, or ask for a swap (flaming_io_store_swap=True).")


class SQLiteKind(IOKind):
    name = "sqlite"
    options = SQLiteOptions

    def check_source(self, spec, settings):
        connect(spec.source, spec.options.table, spec.where()).close()

    def build(self, spec, settings):
        return SQLiteFunction(spec, settings)

    def macs(self, spec, settings):
        return (spec.options.embed_dim or settings.hidden_size) * settings.hidden_size  # W_out
