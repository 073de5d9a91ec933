"""The frozen n-gram encoder of FlamingMoE stores: keys of text chunks and `context` queries.

    key(ids_{t-n+1..t}) = normalize( sum_{j=0}^{n-1} s_j * E[id_{t-n+1+j}] )     in R^K

E [V, K] is a frozen table and s_j in {-1, +1}^K a fixed sign vector per offset j (so order
matters); ids of -1 (before the sequence start) and ids the table does not hold (>= V: the
model's vocabulary may be padded past the tokenizer's) contribute nothing; normalize is the L2
norm (an all-padding window gives the zero key). The table is either drawn from a seed
(`random:<seed>`, E ~ N(0, 1/K), torch's CPU generator: reproducible on every machine) or read
from a .npy file [V, K] (`path:<file>`, e.g. a trained model's input embeddings, recorded with
its sha256). The signs come from seed + 1 (random tables) or seed 0 (file tables).
The store's meta.json records this description, and the model builds its queries from it, so
keys and queries always come from the same encoder.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from neon.errors import IOSourceError


def describe(table: str, n: int, key_dim: int, vocab_size: int) -> dict:
    """The encoder description a store records: {'table', 'n', 'key_dim', 'vocab_size', ...}."""
    desc = {"kind": "ngram", "table": table, "n": int(n), "key_dim": int(key_dim), "vocab_size": int(vocab_size)}
    if table.startswith("path:"):
        with open(table[5:], "rb") as f:
            desc["table_sha256"] = hashlib.sha256(f.read()).hexdigest()
    return desc


class NgramEncoder:
    """Frozen: ids [T, n] (int, -1 = none) -> keys [T, K] float32, unit norm. Its tables are plain
    CPU tensors, not a module's buffers: no checkpoint, device move or meta-device build touches them."""

    def __init__(self, desc: dict):
        self.desc = dict(desc)
        n, k, v = desc["n"], desc["key_dim"], desc["vocab_size"]
        table = desc["table"]
        if table.startswith("random:"):
            seed = int(table[7:])
            gen = torch.Generator().manual_seed(seed)
            weight = torch.randn(v, k, generator=gen, device="cpu") / k ** 0.5
        elif table.startswith("path:"):
            seed = 0
            weight = torch.from_numpy(np.load(table[5:]).astype(np.float32))
            if tuple(weight.shape) != (v, k):
                raise IOSourceError(f"store encoder table {table[5:]} has shape {tuple(weight.shape)}, expected "
                                    f"[{v}, {k}] (vocab_size, key_dim). Fix: restore the table the store was built "
                                    "with, or rebuild the store.")
        else:
            raise IOSourceError(f"store encoder table {table!r}: use 'random:<seed>' or 'path:<file.npy>'")
        gen = torch.Generator().manual_seed(seed + 1)
        self.signs = torch.randint(0, 2, (n, k), generator=gen, device="cpu").float() * 2 - 1
        self.table = weight

    @property
    def n(self) -> int:
        return self.desc["n"]

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids[:, -self.n:].long().cpu()  # [T, n]
        present = ((ids >= 0) & (ids < self.table.shape[0])).unsqueeze(-1).float()  # [T, n, 1]
        vecs = self.table[ids.clamp(0, self.table.shape[0] - 1)] * present * self.signs  # [T, n, K]
        return torch.nn.functional.normalize(vecs.sum(dim=1), dim=-1)  # zero stays zero
