"""The frozen n-gram encoder of FlamingMoE stores: keys of text chunks and `context` queries.

    key(ids_{t-n+1..t}) = normalize( sum_{j=0}^{n-1} s_j * E[id_{t-n+1+j}] )     in R^K

E [V, K] is a frozen table and s_j in {-1, +1}^K a fixed sign vector per offset j (so order
matters); ids of -1 (before the sequence start) contribute nothing; normalize is the L2 norm
(an all-padding window gives the zero key). The table is either drawn from a seed
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


def describe(table: str, n: int, key_dim: int, vocab_size: int) -> dict:
    """The encoder description a store records: {'table', 'n', 'key_dim', 'vocab_size', ...}."""
    desc = {"kind": "ngram", "table": table, "n": int(n), "key_dim": int(key_dim),
            "vocab_size": int(vocab_size)}
    if table.startswith("path:"):
        with open(table[5:], "rb") as f:
            desc["table_sha256"] = hashlib.sha256(f.read()).hexdigest()
    return desc


class NgramEncoder(torch.nn.Module):
    """Frozen: ids [T, n] (int, -1 = none) -> keys [T, K] float32, unit norm."""

    def __init__(self, desc: dict):
        super().__init__()
        self.desc = dict(desc)
        n, k, v = desc["n"], desc["key_dim"], desc["vocab_size"]
        table = desc["table"]
        if table.startswith("random:"):
            seed = int(table[7:])
            gen = torch.Generator().manual_seed(seed)
            weight = torch.randn(v, k, generator=gen) / k ** 0.5
        elif table.startswith("path:"):
            seed = 0
            weight = torch.from_numpy(np.load(table[5:]).astype(np.float32))
            if tuple(weight.shape) != (v, k):
                raise ValueError(f"encoder table {table[5:]} has shape {tuple(weight.shape)}, "
                                 f"expected [{v}, {k}] (vocab_size, key_dim)")
        else:
            raise ValueError(f"encoder table {table!r}: use 'random:<seed>' or 'path:<file.npy>'")
        gen = torch.Generator().manual_seed(seed + 1)
        signs = torch.randint(0, 2, (n, k), generator=gen).float() * 2 - 1
        self.register_buffer("table", weight, persistent=False)
        self.register_buffer("signs", signs, persistent=False)

    @property
    def n(self) -> int:
        return self.desc["n"]

    @torch.no_grad()
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids[:, -self.n:].long().cpu()  # [T, n]
        present = (ids >= 0).unsqueeze(-1).float()  # [T, n, 1]
        vecs = self.table[ids.clamp(min=0)] * present * self.signs  # [T, n, K]
        key = vecs.sum(dim=1)
        return torch.nn.functional.normalize(key, dim=-1)  # zero stays zero
