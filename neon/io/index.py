"""Search indexes of a FlamingMoE store: the top-k inner products of queries against its keys.

    exact     every key scored: blocked over the memory-mapped keys on the host, or one matmul on
              the model's device when the keys fit there (a GPU run does not search on the host)
    ivf_flat  faiss IndexIVFFlat: nlist k-means cells, `nprobe` of them scanned per query
    ivf_pq    faiss IndexIVFPQ: the same cells, keys product-quantized to m codes of nbits; its
              `refine` x k candidates are rescored with the exact keys and the best k kept
              (faiss' IndexRefineFlat, on the store's own keys)
    hnsw      faiss IndexHNSWFlat: a graph with M links per key, `ef_search` candidates per query

The index returns candidate entries; the store rescores them exactly (the keys are kept), so the
weights and their gradient do not depend on the index. faiss (`faiss-cpu`) is imported on use.
The index file is written next to the store's keys (`index.faiss`, memory-mapped at load) and
described in its meta.json: type, build parameters, default search parameters and sha256.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from collections.abc import Callable
from typing import Optional

import numpy as np
import torch

from neon.errors import IOSourceError

INDEX_FILE = "index.faiss"
TYPES = ("exact", "ivf_flat", "ivf_pq", "hnsw")
SEARCH_BLOCK_ROWS = 65536
DEVICE_SHARE = 0.25  # exact search: the keys go to the model's device if they fit in this share of its free memory


def faiss():
    """The faiss module (faiss-cpu), imported on first use."""
    try:
        return importlib.import_module("faiss")
    except ImportError:
        raise IOSourceError("this store's index needs faiss. Fix: pip install faiss-cpu (requirements.txt pins "
                            "the tested version), or build the store with --index exact.") from None


class ExactSearch:
    """Every key scored. keys: [N, K] float32 (a memmap)."""

    def __init__(self, keys: np.ndarray):
        self.keys = keys
        self._on_device: Optional[torch.Tensor] = None

    def _device_keys(self, device: torch.device) -> Optional[torch.Tensor]:
        if device.type != "cuda":
            return None
        if self._on_device is None or self._on_device.device != device:
            free, _ = torch.cuda.mem_get_info(device)
            if self.keys.nbytes > DEVICE_SHARE * free:
                return None
            self._on_device = torch.from_numpy(np.ascontiguousarray(self.keys)).to(device)
        return self._on_device

    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        """queries [Q, K] -> entry indices [Q, k] int64 (on the CPU), best first."""
        on_device = self._device_keys(queries.device)
        if on_device is not None:
            return torch.topk(queries.float() @ on_device.T, k, dim=1).indices.cpu()
        return exact_topk(queries, self.keys, k)[1]


@torch.no_grad()
def exact_topk(queries: torch.Tensor, keys: np.ndarray, k: int, block_rows: int = SEARCH_BLOCK_ROWS):
    """queries [Q, K], keys [N, K] (memmap) -> (scores [Q, k], indices [Q, k] int64) on the CPU.

    One pass over the keys in blocks of `block_rows`, keeping the running top-k: memory
    O(Q * (k + block_rows)), exact (every key is scored)."""
    q = queries.detach().float().cpu()
    best_s = torch.full((q.shape[0], 0), float("-inf"))
    best_i = torch.zeros((q.shape[0], 0), dtype=torch.long)
    for start in range(0, keys.shape[0], block_rows):
        block = torch.from_numpy(np.array(keys[start:start + block_rows]))
        s = q @ block.T  # [Q, rows]
        idx = torch.arange(start, start + block.shape[0]).expand_as(s)
        cand_s, cand_i = torch.cat([best_s, s], dim=1), torch.cat([best_i, idx], dim=1)
        top = torch.topk(cand_s, min(k, cand_s.shape[1]), dim=1)
        best_s, best_i = top.values, cand_i.gather(1, top.indices)
    return best_s, best_i


class FaissSearch:
    """A faiss index of keys [N, K] that `meta` describes; search parameters set here."""

    def __init__(self, index, meta: dict, keys: np.ndarray, nprobe: int = 0, ef_search: int = 0):
        self.index, self.meta = index, meta
        self.type, self.keys, self.refine = meta["type"], keys, meta.get("refine", 1)
        if self.type in ("ivf_flat", "ivf_pq"):
            self.index.nprobe = nprobe or meta["nprobe"]
        elif self.type == "hnsw":
            self.index.hnsw.efSearch = ef_search or meta["ef_search"]

    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        """queries [Q, K] -> entry indices [Q, k] int64 (-1: fewer than k found), best first."""
        q = np.ascontiguousarray(queries.detach().float().cpu().numpy())
        _, idx = self.index.search(q, k * self.refine)
        idx = torch.from_numpy(idx).long()
        if self.refine > 1:  # rescore the candidates with the exact keys, keep the best k
            cand = torch.from_numpy(np.array(self.keys[idx.clamp(min=0).reshape(-1).numpy()])).view(*idx.shape, -1)
            scores = (torch.from_numpy(q).unsqueeze(1) * cand).sum(-1).masked_fill(idx < 0, float("-inf"))
            idx = idx.gather(1, torch.topk(scores, k, dim=1).indices)
        return idx


def open_index(store_path: str, meta: Optional[dict], keys: np.ndarray, nprobe: int = 0, ef_search: int = 0):
    """The store's search: exact without an index in meta.json, else its faiss index."""
    if not meta or meta["type"] == "exact":
        return ExactSearch(keys)
    path = os.path.join(store_path, INDEX_FILE)
    if not os.path.isfile(path) or os.path.getsize(path) != meta["bytes"]:
        raise IOSourceError(f"store {store_path!r}: its {meta['type']} index {INDEX_FILE} is missing or has another "
                            f"size than meta.json records ({meta['bytes']} bytes). Fix: rebuild the store.")
    f = faiss()
    index = f.read_index(path, f.IO_FLAG_MMAP | f.IO_FLAG_READ_ONLY)  # memory-mapped
    return FaissSearch(index, meta, keys, nprobe=nprobe, ef_search=ef_search)


# --- building (tools/build_flaming_store.py) --------------------------------------------------------


def index_params(index_type: str, entries: int, key_dim: int, *, nlist: int = 0, nprobe: int = 16, pq_m: int = 0,
                 pq_nbits: int = 8, refine: int = 4, hnsw_m: int = 32, ef_construction: int = 64,
                 ef_search: int = 64) -> dict:
    """The description of an index of `entries` keys build_index builds, with its default search
    parameters (nlist default: 4 sqrt(entries), faiss' rule of thumb, at most entries / 39, the
    points its k-means wants per cell; PQ codes: key_dim / 4)."""
    if index_type not in TYPES:
        raise IOSourceError(f"index {index_type!r} is not one of {TYPES}. Fix: use one of them.")
    if index_type == "exact":
        return {"type": "exact"}
    if index_type == "hnsw":
        return {"type": "hnsw", "M": hnsw_m, "ef_construction": ef_construction, "ef_search": ef_search}
    nlist = nlist or max(1, min(int(4 * entries ** 0.5), entries // 39))
    if nlist * 39 > entries:
        raise IOSourceError(f"index {index_type}: {entries} entries are too few for {nlist} cells (faiss' k-means "
                            f"wants 39 per cell). Fix: nlist {max(1, entries // 39)} or fewer, or the exact search.")
    params = {"type": index_type, "nlist": nlist, "nprobe": min(nprobe, nlist)}
    if index_type == "ivf_pq":
        m = pq_m or max(1, key_dim // 4)
        if key_dim % m:
            raise IOSourceError(f"index ivf_pq: {m} codes do not divide key_dim {key_dim}. Fix: a divisor of it.")
        nbits = max(1, min(pq_nbits, int(np.log2(max(2, entries // 39)))))  # 2^nbits centroids need 39 points each
        params.update(m=m, nbits=nbits, refine=refine)
    return params


def factory_string(meta: dict) -> str:
    if meta["type"] == "ivf_flat":
        return f"IVF{meta['nlist']},Flat"
    if meta["type"] == "ivf_pq":
        return f"IVF{meta['nlist']},PQ{meta['m']}x{meta['nbits']}"
    if meta["type"] == "hnsw":
        return f"HNSW{meta['M']}"
    raise ValueError(f"no faiss index for type {meta['type']!r}")


def build_index(store_path: str, keys: np.ndarray, params: dict, progress: Optional[Callable[[str, int, int], None]]
                = None, seed: int = 1234, batch: int = 65536) -> dict:
    """Train and fill the index `params` describes ({'type': ..., build parameters, default search
    parameters}) over keys [N, K]; write it to INDEX_FILE; return its meta.json description.
    progress(stage, done, total) is called as it goes."""
    meta = dict(params)
    if meta["type"] == "exact":
        return meta
    index = train_and_fill(keys, meta, progress, seed=seed, batch=batch)
    path = os.path.join(store_path, INDEX_FILE)
    faiss().write_index(index, path + ".tmp")
    os.replace(path + ".tmp", path)
    meta["bytes"] = os.path.getsize(path)
    meta["sha256"] = file_sha256(path)
    return meta


def train_and_fill(keys: np.ndarray, params: dict, progress: Optional[Callable[[str, int, int], None]] = None,
                   seed: int = 1234, batch: int = 65536):
    """The faiss index `params` describes, trained on a sample of keys [N, K] drawn with `seed`
    and filled with all of them. faiss' k-means has a fixed seed too: the same keys give the same
    index, whatever the number of threads."""
    f = faiss()
    n, dim = keys.shape
    index = f.index_factory(dim, factory_string(params), f.METRIC_INNER_PRODUCT)
    if params["type"] == "hnsw":
        index.hnsw.efConstruction = params["ef_construction"]
    if not index.is_trained:
        sample = min(n, 64 * params["nlist"])  # faiss' k-means wants 39 to 256 points per cell
        rows = np.sort(np.random.default_rng(seed).choice(n, size=sample, replace=False))
        if progress:
            progress("train", 0, sample)
        index.train(np.ascontiguousarray(keys[rows]))
        if progress:
            progress("train", sample, sample)
    for start in range(0, n, batch):
        index.add(np.ascontiguousarray(keys[start:start + batch]))
        if progress:
            progress("add", min(n, start + batch), n)
    return index


def snapshot_search(keys: np.ndarray, nprobe: int = 0) -> FaissSearch:
    """An IVF-Flat index of keys held in memory, not on disk (a snapshot of learned keys, rebuilt
    from the snapshot when needed): sqrt(N) cells, at most N / 39; `nprobe` of them scanned
    (default 16)."""
    n = keys.shape[0]
    nlist = max(1, min(int(n ** 0.5), n // 39))
    params = {"type": "ivf_flat", "nlist": nlist, "nprobe": min(16, nlist)}
    return FaissSearch(train_and_fill(keys, params), params, keys, nprobe=nprobe)


def file_sha256(path: str, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
