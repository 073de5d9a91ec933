"""`store`: a read-only key-value store on disk as a FlamingMoE IO function.

Layout (a directory, written by tools/build_flaming_store.py):

    meta.json    format, entries N, key_dim K, values ('tokens' | 'vectors'), value_width M,
                 the encoder of the keys (neon/flaming/encoder.py), file sizes, content sha256
    keys.f32     [N, K] float32, row i = encoder(text chunk i)
    values.bin   [N, M] int32 continuation token ids (-1: none) or float32 vectors

Both files are numpy memmaps: the store may be far larger than memory; a search reads it in
blocks of rows. Per routed token t (all of a micro-batch's routed tokens in one search):

    q_t = encoder(ids_{t-n+1..t})          query='context' (frozen, as in Engram)
    q_t = W_q x_t                          query='hidden'  (learned)
    (s, i) = exact top-k of <q_t, key_j> over all j          (blocked, no approximate index)
    w = softmax(s / temperature)                             (gradient reaches W_q)
    read_t = sum_k w_k value(i_k);  value = concat_m Emb[id_m] (tokens, own embedding) or the vector
    f(x_t, c_t) = W_out read_t

faiss is not used: the exact blocked search is the reference, and no approximate index is
pinned or tested yet.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np
import torch

from neon.flaming.encoder import NgramEncoder
from neon.flaming.io import IOFunction, IOFunctionSpec, IOSourceError, base_context, context_ids

FORMAT, VERSION = "neon-flaming-store", 1
KEYS, VALUES, META = "keys.f32", "values.bin", "meta.json"
SEARCH_BLOCK_ROWS = 65536


@dataclass
class Store:
    path: str
    meta: dict
    keys: np.memmap    # [N, K] float32
    values: np.memmap  # [N, M] int32 or float32

    @property
    def entries(self) -> int:
        return self.meta["entries"]

    def identity(self) -> dict:
        """What a checkpoint records: path, size and content hash (not the contents)."""
        return {"path": os.path.abspath(self.path), "entries": self.meta["entries"],
                "key_dim": self.meta["key_dim"], "bytes": self.meta["keys_bytes"] + self.meta["values_bytes"],
                "content_sha256": self.meta["content_sha256"]}


def content_hash(path: str, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    for name in (KEYS, VALUES):
        with open(os.path.join(path, name), "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    return h.hexdigest()


def _fail(where: str, path: str, problem: str, fix: str):
    raise IOSourceError(f"{where}: store {path!r} {problem}. Fix: {fix}.")


def open_store(path: str, where: str = "store", verify: bool = False) -> Store:
    """Open (memory-map) a store; a missing, foreign or truncated store is a clear error."""
    meta_path = os.path.join(path, META)
    if not os.path.isfile(meta_path):
        _fail(where, path, "does not exist (no meta.json)", "build it with tools/build_flaming_store.py "
              "or give the right path in flaming_io_functions")
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        _fail(where, path, f"is not a {FORMAT} v{VERSION} store", "rebuild it with tools/build_flaming_store.py")
    n, k, m = meta["entries"], meta["key_dim"], meta["value_width"]
    vdtype = np.int32 if meta["values"] == "tokens" else np.float32
    for name, expect in ((KEYS, n * k * 4), (VALUES, n * m * 4)):
        file = os.path.join(path, name)
        size = os.path.getsize(file) if os.path.isfile(file) else -1
        if size != expect:
            _fail(where, path, f"has {name} of {size} bytes, expected {expect} (truncated or "
                  "missing file)", "rebuild the store")
    if verify and content_hash(path) != meta["content_sha256"]:
        _fail(where, path, "does not match its recorded content hash", "rebuild the store")
    keys = np.memmap(os.path.join(path, KEYS), dtype=np.float32, mode="r", shape=(n, k))
    values = np.memmap(os.path.join(path, VALUES), dtype=vdtype, mode="r", shape=(n, m))
    return Store(path, meta, keys, values)


def check_identity(recorded: dict, store: Store, swap: bool = False, where: str = "store") -> None:
    """At checkpoint load: the store must be the one the checkpoint was trained with, unless the
    user asks for a swap (another store attached without retraining)."""
    now = store.identity()
    if swap:
        if now["key_dim"] != recorded["key_dim"]:
            _fail(where, store.path, f"has key_dim {now['key_dim']}, the checkpoint's store had "
                  f"{recorded['key_dim']}", "swap in a store built with the same encoder")
        return
    if now["content_sha256"] != recorded["content_sha256"] or now["entries"] != recorded["entries"]:
        _fail(where, store.path, f"differs from the checkpoint's store {recorded['path']!r} "
              f"({recorded['entries']} entries, sha256 {recorded['content_sha256'][:12]}...)",
              "attach the original store, or ask for a swap (flaming_io_store_swap=True) to use this one")


# --- exact blocked top-k inner-product search ------------------------------------------------------


@torch.no_grad()
def exact_topk(queries: torch.Tensor, keys: np.ndarray, k: int, block_rows: int = SEARCH_BLOCK_ROWS):
    """queries [Q, K] float32, keys [N, K] (memmap) -> (scores [Q, k], indices [Q, k] int64).

    One pass over the keys in blocks of `block_rows`, keeping the running top-k: memory
    O(Q * (k + block_rows)), exact (every key is scored)."""
    q = queries.detach().float().cpu()
    n = keys.shape[0]
    best_s = torch.full((q.shape[0], 0), float("-inf"))
    best_i = torch.zeros((q.shape[0], 0), dtype=torch.long)
    for start in range(0, n, block_rows):
        block = torch.from_numpy(np.array(keys[start:start + block_rows]))
        s = q @ block.T  # [Q, rows]
        idx = torch.arange(start, start + block.shape[0]).expand_as(s)
        cand_s, cand_i = torch.cat([best_s, s], dim=1), torch.cat([best_i, idx], dim=1)
        top = torch.topk(cand_s, min(k, cand_s.shape[1]), dim=1)
        best_s, best_i = top.values, cand_i.gather(1, top.indices)
    return best_s, best_i


# --- the IO function -------------------------------------------------------------------------------


class StoreFunction(IOFunction):
    def __init__(self, config, spec: IOFunctionSpec):
        super().__init__(config, spec)
        self.store = open_store(spec.source, where=spec.where())
        meta = self.store.meta
        if self.store.entries < spec.topk:
            raise IOSourceError(f"{spec.where()}: the store has {self.store.entries} entries, fewer "
                                f"than topk={spec.topk}. Fix: lower topk or build a larger store.")
        if meta["encoder"]["vocab_size"] != config.vocab_size:
            raise IOSourceError(f"{spec.where()}: the store was built for vocab_size "
                                f"{meta['encoder']['vocab_size']}, the model has {config.vocab_size}. "
                                "Fix: build the store with the model's tokenizer (--vocab-size).")
        self.encoder = NgramEncoder(meta["encoder"])
        window = config.flaming_io_context_window
        if spec.query == "context" and self.encoder.n > window:
            raise IOSourceError(f"{spec.where()}: its encoder reads n={self.encoder.n} ids but "
                                f"flaming_io_context_window={window}. Fix: set "
                                f"flaming_io_context_window >= {self.encoder.n}.")
        if spec.query == "hidden":  # learned query W_q x
            self.query_proj = torch.nn.Linear(config.hidden_size, meta["key_dim"], bias=False)
            torch.nn.init.normal_(self.query_proj.weight, std=config.init_method_std)
        if meta["values"] == "tokens":
            vocab = meta["encoder"]["vocab_size"]
            self.embed_dim = spec.embed_dim or config.hidden_size
            self.value_embedding = torch.nn.Embedding(vocab, self.embed_dim)
            torch.nn.init.normal_(self.value_embedding.weight, std=config.init_method_std)
            value_dim = meta["value_width"] * self.embed_dim
        else:
            value_dim = meta["value_width"]
        self.build_out(value_dim)
        from neon.flaming.search_reuse import search_layout

        # (first column, k) of the indices the model searched once per micro-batch, or None
        self.reused_columns = search_layout(config).get(spec.name) if spec.bank == "global" else None
        self.searched_rows = 0  # queries this function searched itself (not reused)

    def own_context(self, context):
        """The token context, and the reused search's index columns after it when there are."""
        return context if self.reused_columns else super().own_context(context)

    def query(self, hidden_states, context):
        if self.spec.query == "context":
            return self.encoder(context_ids(context)).to(hidden_states.device)
        return self.query_proj(hidden_states.to(self.query_proj.weight.dtype)).float()

    def value_vectors(self, idx: torch.Tensor, device) -> torch.Tensor:
        """idx [T, k] -> [T, k, value_dim]."""
        raw = torch.from_numpy(np.array(self.store.values[idx.reshape(-1).numpy()]))
        raw = raw.view(*idx.shape, -1).to(device)  # [T, k, M]
        if self.store.meta["values"] != "tokens":
            return raw.float()
        emb = self.value_embedding(raw.long().clamp(min=0)) * (raw >= 0).unsqueeze(-1)  # [T, k, M, e]
        return emb.flatten(2)

    def search(self, q: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The top-k entry indices [T, k]: the model's once-per-micro-batch search when the
        context carries it (neon/flaming/search_reuse.py), else this function's own search."""
        if self.reused_columns is not None:
            start, k = self.reused_columns
            if context.shape[1] >= start + k:
                return context[:, start:start + k].cpu()
        self.searched_rows += q.shape[0]
        return exact_topk(q, self.store.keys, self.spec.topk)[1]

    def read(self, hidden_states, context):
        q = self.query(hidden_states, base_context(context, self.config.flaming_io_context_window))  # [T, K]
        idx = self.search(q, context)  # [T, k]
        sel = torch.from_numpy(np.array(self.store.keys[idx.reshape(-1).numpy()]))
        sel = sel.view(*idx.shape, -1).to(q.device)  # [T, k, K]
        scores = (q.unsqueeze(1) * sel).sum(-1)  # [T, k], differentiable in q
        w = torch.softmax(scores / self.spec.temperature, dim=-1)
        return (w.unsqueeze(-1) * self.value_vectors(idx, q.device)).sum(1)  # [T, value_dim]

    def source_identity(self) -> dict:
        return {**super().source_identity(), **self.store.identity()}

    def check_source(self, recorded: dict) -> None:
        check_identity(recorded, self.store, swap=self.config.flaming_io_store_swap,
                       where=self.spec.where())


def swap_store(model: torch.nn.Module, name: str, path: str) -> int:
    """Attach another store to every StoreFunction named `name` (evaluation or generation
    without retraining: the knowledge lives outside the weights), and to the model's
    once-per-micro-batch search of it (neon/flaming/search_reuse.py). Its encoder and value
    layout must match the current store's. Returns the number of functions and searches swapped."""
    users = [m for m in model.modules() if isinstance(m, StoreFunction) and m.spec.name == name]
    users += [search for m in model.modules()
              for n, search in (getattr(m, "context_searches", None) or {}).items() if n == name]
    if not users:
        raise IOSourceError(f"no store IO function named {name!r} in the model")
    where = users[0].spec.where()
    new = open_store(path, where=where)
    old = users[0].store.meta
    for key in ("encoder", "values", "value_width", "key_dim"):
        if new.meta[key] != old[key]:
            _fail(where, path, f"has {key}={new.meta[key]!r}, the attached store has {old[key]!r}",
                  "swap in a store built with the same encoder and values")
    for user in users:
        user.store = new
    return len(users)
