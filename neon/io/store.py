"""`store`: a read-only key-value store on disk as a FlamingMoE IO function.

    "name=facts,kind=store,source=/data/facts_store,query=context,topk=4[,nprobe=32][,ef_search=64]"

Layout (a directory, written by tools/build_flaming_store.py):

    meta.json     format, entries N, key_dim K, values ('tokens' | 'vectors'), value_width M,
                  the encoder of the keys (neon/io/encoder.py), file sizes, content sha256, and
                  the search index (neon/io/index.py: type, parameters, sha256)
    keys.f32      [N, K] float32, row i = encoder(text chunk i)
    values.bin    [N, M] int32 continuation token ids (-1: none) or float32 vectors
    key_ids.i32   [N, n] the ids each key was made from
    passage.i64   [N] a fingerprint of the L ids up to each entry (built with --passage-ids L)
    index.faiss   the faiss index of the keys (absent for the exact search)

The files are memory-mapped: the store may be far larger than memory. Per routed token t (all of
a micro-batch's routed tokens in one search):

    q_t = encoder(ids_{t-n+1..t})          query='context' (frozen, as in Engram)
    q_t = W_q x_t                          query='hidden'  (learned, over the frozen keys)
    q_t = Norm(W_q x_t)                    query='learned' (learned, over learned keys, below)
    i = top-k of <q_t, key_j> over j       (the store's index: exact, IVF or HNSW)
    s = <q_t, key_i> rescored exactly;  w = softmax(s / temperature)   (gradient reaches W_q)
    read_t = sum_k w_k value(i_k);  value = concat_m Emb[id_m] (tokens, own embedding) or the vector
    f(x_t, c_t) = W_out read_t

query='learned': a query the model learns needs keys it can move and a training signal of its own
(with fixed keys the only gradient reorders the k entries a random query already found, which
hold the right one with probability about k / N; docs/flaming_moe.md). So, as in product-key and
Memorizing-Transformer memories, the keys are learned too, from each entry's key ids
(key_ids.i32, the n ids its frozen key was made from):

    key_j = Norm(sum_p E_p[id_{j,p}])      E_p: a learned embedding per window position

searched in one of two ways. With reindex=0, every key is recomputed from E and scored at every
forward pass (stores up to LEARNED_MAX_ENTRIES entries). With reindex=R, as in REALM, the
candidates come from an IVF index of a snapshot of the keys, and the snapshot (E as it was,
a buffer of the checkpoint, so a resume searches the same index) is refreshed and the index
rebuilt after every R-th optimizer step; the candidates' keys are recomputed from the current E
for the scores. The query gets a contrastive loss (InfoNCE, weight `contrastive`) whose teacher
is the `context` query: the entry whose frozen key equals the token's own n-gram code (an exact
window match) is the positive, the other tokens' positives and the retrieved entries the
negatives. The loss joins the backward pass through AttachLoss. With `null=1` a learned null key
joins each read's softmax with a zero value, so a token may read nothing. recall@k (the teacher
entry among the k retrieved) and the contrastive loss go to the training log per function.

A global-bank `context`-query store is searched once per forward pass for every layer
(`ContextSearch`, a context provider): its query depends only on the token's ids, so every layer
would find the same entries; the layers read them from the context's columns.

With `exclude=1` (a store built with --passage-ids L) a search skips the entries whose L ids up
to them are the token's own last L ids: the token's own position, when the store holds the
text being trained on, and verbatim copies of its passage (RETRO leaves the training sequence's
own chunks out of its neighbours the same way). Without it, a store of the training split hands
every training token its own next id, which the model learns to copy and validation text does
not offer (docs/ablations.md).

Options: query, topk, temperature, embed_dim (own embedding width of token values, 0: the hidden
size), null (a null entry, 0/1), contrastive (the learned query's loss weight), reindex (steps
between re-indexes of learned keys, 0: exact search), exclude (0/1, above), and the search
parameters nprobe (IVF cells scanned) and ef_search (HNSW candidates), which change how the
search runs, not what was trained: they may differ at a resume or in the export.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import torch

from neon.errors import IOSourceError
from neon.io.base import AttachLoss, ContextProvider, IOFunction, IOKind, IOSettings, IOSpec, context_ids
from neon.io.encoder import NgramEncoder
from neon.io.index import faiss, open_index, snapshot_search

FORMAT, VERSION = "neon-flaming-store", 1
KEYS, VALUES, KEY_IDS, META = "keys.f32", "values.bin", "key_ids.i32", "meta.json"
PASSAGE = "passage.i64"
EXCLUDE_SLACK = 8  # more entries searched per token with exclude=1, to keep topk after skipping
LEARNED_MAX_ENTRIES = 200_000  # learned keys are recomputed and searched exactly at every forward pass


@dataclass(frozen=True)
class StoreOptions:
    query: Literal["context", "hidden", "learned"] = "context"
    topk: int = 4
    temperature: float = 1.0
    embed_dim: int = 0
    null: int = 0
    contrastive: float = 1.0
    exclude: int = 0
    reindex: int = 0
    nprobe: int = 0
    ef_search: int = 0


# --- the store on disk ----------------------------------------------------------------------------


class Store:
    """An opened store: its meta, memory-mapped keys [N, K], values [N, M] and key ids [N, n] (None
    in stores written before they were kept), and its search."""

    def __init__(self, path: str, meta: dict, keys: np.memmap, values: np.memmap, search,
                 key_ids: Optional[np.memmap] = None, passages: Optional[np.memmap] = None):
        self.path, self.meta, self.keys, self.values, self.index = path, meta, keys, values, search
        self.key_ids, self.passages = key_ids, passages

    @property
    def entries(self) -> int:
        return self.meta["entries"]

    @property
    def passage_ids(self) -> int:
        """L of the passage fingerprints (0: the store has none)."""
        return self.meta.get("passage_ids", 0)

    def search(self, queries: torch.Tensor, k: int, own: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[T, k] entry indices (-1: none); with `own` [T] passage fingerprints, the entries of
        those passages skipped."""
        if own is None:
            return self.index.search(queries, k)
        return self.skip_own(self.index.search(queries, k + EXCLUDE_SLACK), own, k)

    def skip_own(self, idx: torch.Tensor, own: torch.Tensor, k: int) -> torch.Tensor:
        """idx [T, k + s] candidates, best first -> [T, k]: the first k not of the passages `own` [T]."""
        found = torch.from_numpy(np.array(self.passages[idx.clamp(min=0).reshape(-1).numpy()])).view(idx.shape)
        keep = (idx >= 0) & (found != own.cpu().unsqueeze(1))
        first = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :k]  # the kept ones, in order
        return torch.where(keep, idx, -1).gather(1, first)

    def identity(self) -> dict:
        """What a checkpoint records: path, size and content hash (not the contents), and the
        index. Its files must still be the ones opened (OSError / IOSourceError otherwise)."""
        for name, expect in ((KEYS, self.meta["keys_bytes"]), (VALUES, self.meta["values_bytes"])):
            if os.path.getsize(os.path.join(self.path, name)) != expect:
                raise IOSourceError(f"store {self.path!r}: {name} no longer has the {expect} bytes it had")
        out = {"path": os.path.abspath(self.path), "entries": self.meta["entries"], "key_dim": self.meta["key_dim"],
               "bytes": self.meta["keys_bytes"] + self.meta["values_bytes"],
               "content_sha256": self.meta["content_sha256"]}
        index = self.meta.get("index")
        if index and index["type"] != "exact":
            out["index"] = {k: index[k] for k in ("type", "sha256")}
        return out


def content_hash(path: str, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    for name in (KEYS, VALUES, KEY_IDS, PASSAGE):
        if name in (KEY_IDS, PASSAGE) and not os.path.isfile(os.path.join(path, name)):
            continue  # stores written before key ids were kept, or without passage fingerprints
        with open(os.path.join(path, name), "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    return h.hexdigest()


def _fail(where: str, path: str, problem: str, fix: str):
    raise IOSourceError(f"{where}: store {path!r} {problem}. Fix: {fix}.")


def open_store(path: str, where: str = "store", verify: bool = False, nprobe: int = 0, ef_search: int = 0) -> Store:
    """Open (memory-map) a store and its index; a missing, foreign or truncated store is a clear error."""
    meta_path = os.path.join(path, META)
    if not os.path.isfile(meta_path):
        _fail(where, path, "does not exist (no meta.json)", "build it with tools/build_flaming_store.py or give the "
              "right path in flaming_io_functions")
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        _fail(where, path, f"is not a {FORMAT} v{VERSION} store", "rebuild it with tools/build_flaming_store.py")
    n, k, m = meta["entries"], meta["key_dim"], meta["value_width"]
    vdtype = np.int32 if meta["values"] == "tokens" else np.float32
    n_ids = meta["encoder"]["n"]
    files = [(KEYS, n * k * 4), (VALUES, n * m * 4)] + ([(KEY_IDS, n * n_ids * 4)] if "key_ids_bytes" in meta else [])
    files += [(PASSAGE, n * 8)] if "passage_bytes" in meta else []
    for name, expect in files:
        file = os.path.join(path, name)
        size = os.path.getsize(file) if os.path.isfile(file) else -1
        if size != expect:
            _fail(where, path, f"has {name} of {size} bytes, expected {expect} (truncated or missing file)",
                  "rebuild the store")
    if verify and content_hash(path) != meta["content_sha256"]:
        _fail(where, path, "does not match its recorded content hash", "rebuild the store")
    keys = np.memmap(os.path.join(path, KEYS), dtype=np.float32, mode="r", shape=(n, k))
    values = np.memmap(os.path.join(path, VALUES), dtype=vdtype, mode="r", shape=(n, m))
    key_ids = (np.memmap(os.path.join(path, KEY_IDS), dtype=np.int32, mode="r", shape=(n, n_ids))
               if "key_ids_bytes" in meta else None)
    passages = (np.memmap(os.path.join(path, PASSAGE), dtype=np.int64, mode="r", shape=(n,))
                if "passage_bytes" in meta else None)
    try:
        search = open_index(path, meta.get("index"), keys, nprobe=nprobe, ef_search=ef_search)
    except IOSourceError as e:
        raise IOSourceError(f"{where}: {e}") from None
    return Store(path, meta, keys, values, search, key_ids, passages)


def check_identity(recorded: dict, store: Store, swap: bool = False, where: str = "store") -> None:
    """At checkpoint load: the store (and its index) must be the one the checkpoint was trained
    with, unless the user asks for a swap (another store attached without retraining)."""
    now = store.identity()
    if swap:
        if now["key_dim"] != recorded["key_dim"]:
            _fail(where, store.path, f"has key_dim {now['key_dim']}, the checkpoint's store had {recorded['key_dim']}",
                  "swap in a store built with the same encoder")
        return
    if now["content_sha256"] != recorded["content_sha256"] or now["entries"] != recorded["entries"]:
        _fail(where, store.path, f"differs from the checkpoint's store {recorded['path']!r} ({recorded['entries']} "
              f"entries, sha256 {recorded['content_sha256'][:12]}...)",
              "attach the original store, or ask for a swap (flaming_io_store_swap=True) to use this one")
    if now.get("index") != recorded.get("index"):
        _fail(where, store.path, f"has the index {now.get('index') or 'exact'}, the checkpoint's store had "
              f"{recorded.get('index') or 'exact'} (another index finds other entries)",
              "attach the store with the original index, or ask for a swap (flaming_io_store_swap=True)")


# --- writing a store (tools/build_flaming_store.py) -----------------------------------------------------


def token_entries(ids: list[int], n: int, width: int, stride: int = 1):
    """-> (windows [E, n] int64, values [E, width] int32) of one document: for every position i
    (stride `stride`), key window ids[i-n+1 .. i] and value ids[i+1 .. i+width] (-1 past the ends)."""
    ids = list(ids)
    pad = [-1] * (n - 1) + ids + [-1] * width
    wins, vals = [], []
    for i in range(0, len(ids) - 1, stride):  # positions with at least one continuation token
        wins.append(pad[i:i + n])
        vals.append(pad[i + n:i + n + width])
    return np.asarray(wins, dtype=np.int64).reshape(-1, n), np.asarray(vals, dtype=np.int32).reshape(-1, width)


def passage_fingerprint(ids: torch.Tensor) -> torch.Tensor:
    """[T, L] ids (-1: none) -> [T] int64, equal for equal rows (a polynomial hash mod 2^31 - 1)."""
    h = torch.zeros(ids.shape[0], dtype=torch.int64)
    for column in ids.long().cpu().unbind(1):
        h = (h * 1_000_003 + column + 2) % 2_147_483_647
    return h


def write_store(path: str, encoder_desc: dict, records: Iterable, values: str = "tokens", value_width: int = 1,
                stride: int = 1, progress: Optional[Callable] = None, batch: int = 4096,
                index: Optional[dict] = None, index_progress: Optional[Callable] = None,
                passage_ids: int = 0) -> dict:
    """records: token-id lists (values='tokens') or (ids, vector) pairs (values='vectors').
    Writes keys.f32, values.bin, key_ids.i32, passage.i64 (passage_ids > 0, tokens only), the
    index (`index`: neon/io/index.py's parameters; None: exact) and meta.json, last, under `path`;
    returns the meta."""
    from neon.io.index import build_index

    os.makedirs(path, exist_ok=True)
    passage_ids = passage_ids if values == "tokens" else 0
    enc = NgramEncoder(encoder_desc)
    n = enc.n
    entries = 0
    with (open(os.path.join(path, KEYS), "wb") as fk, open(os.path.join(path, VALUES), "wb") as fv,
          open(os.path.join(path, KEY_IDS), "wb") as fi, open(os.path.join(path, PASSAGE), "wb") as fp):
        for rec in records:
            if values == "tokens":
                wins, vals = token_entries(rec, n, value_width, stride)
                if passage_ids:
                    passages = torch.from_numpy(token_entries(rec, passage_ids, 1, stride)[0])
                    fp.write(passage_fingerprint(passages).numpy().tobytes())
            else:
                ids, vec = rec
                wins = np.asarray([([-1] * n + list(ids))[-n:]], dtype=np.int64)
                vals = np.asarray([vec], dtype=np.float32).reshape(1, value_width)
            for s in range(0, len(wins), batch):
                keys = enc(torch.from_numpy(wins[s:s + batch])).numpy().astype(np.float32)
                fk.write(keys.tobytes())
                fv.write(np.ascontiguousarray(vals[s:s + batch]).tobytes())
                fi.write(np.ascontiguousarray(wins[s:s + batch], dtype=np.int32).tobytes())
            entries += len(wins)
            if progress is not None:
                progress(1)
    k = encoder_desc["key_dim"]
    meta = {"format": FORMAT, "version": VERSION, "entries": entries, "key_dim": k, "values": values,
            "value_width": value_width, "encoder": encoder_desc, "keys_bytes": entries * k * 4,
            "values_bytes": entries * value_width * 4, "key_ids_bytes": entries * n * 4}
    if passage_ids:
        meta.update(passage_ids=passage_ids, passage_bytes=entries * 8)
    else:
        os.remove(os.path.join(path, PASSAGE))
    meta["content_sha256"] = content_hash(path)
    if index and index["type"] != "exact":
        keys = np.memmap(os.path.join(path, KEYS), dtype=np.float32, mode="r", shape=(entries, k))
        meta["index"] = build_index(path, keys, index, progress=index_progress)
    with open(os.path.join(path, META + ".tmp"), "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(os.path.join(path, META + ".tmp"), os.path.join(path, META))  # meta last: complete
    return meta


# --- the IO function ---------------------------------------------------------------------------------


class StoreFunction(IOFunction):
    def __init__(self, spec: IOSpec, settings: IOSettings):
        super().__init__(spec, settings)
        o = spec.options
        self.store = open_store(spec.source, where=spec.where(), nprobe=o.nprobe, ef_search=o.ef_search)
        meta = self.store.meta
        self.encoder = NgramEncoder(meta["encoder"])
        if o.query in ("hidden", "learned"):  # learned query W_q x
            self.query_proj = torch.nn.Linear(settings.hidden_size, meta["key_dim"], bias=False)
            torch.nn.init.normal_(self.query_proj.weight, std=settings.init_std)
        if o.query == "learned":  # learned keys: E_p [vocab, K] per window position p
            n, vocab = meta["encoder"]["n"], meta["encoder"]["vocab_size"]
            self.key_embedding = torch.nn.Embedding(n * vocab, meta["key_dim"])
            torch.nn.init.normal_(self.key_embedding.weight, std=1.0)
            self.key_vocab = vocab  # E_p's rows start at p * vocab
            if o.reindex:  # E when the keys were last indexed: the index is rebuilt from it
                self.register_buffer("indexed_key_embedding", self.key_embedding.weight.detach().clone())
                self._snapshot_index = None
        if o.null:  # the null entry's key, in the query's space
            self.null_key = torch.nn.Parameter(torch.zeros(meta["key_dim"]))
        if meta["values"] == "tokens":
            self.embed_dim = o.embed_dim or settings.hidden_size
            self.value_embedding = torch.nn.Embedding(meta["encoder"]["vocab_size"], self.embed_dim)
            torch.nn.init.normal_(self.value_embedding.weight, std=settings.init_std)
            value_dim = meta["value_width"] * self.embed_dim
        else:
            value_dim = meta["value_width"]
        self.build_out(value_dim)
        self.searched_rows = 0  # queries this function searched itself (not read from the context)
        self.log = {"recall": [0.0, 0.0], "contrastive_loss": [0.0, 0.0]}  # [sum, count] since the last report

    def query(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if self.spec.options.query == "context":
            return self.encoder(context_ids(context, self.settings.context_window)).to(x.device)
        q = self.query_proj(x.to(self.query_proj.weight.dtype)).float()
        return torch.nn.functional.normalize(q, dim=-1) if self.spec.options.query == "learned" else q

    def learned_keys(self, rows: Optional[torch.Tensor] = None, weight: Optional[torch.Tensor] = None,
                     block: int = 1 << 18) -> torch.Tensor:
        """Norm(sum_p E_p[id_{j,p}]) of entries `rows` (all: [N, K]); missing ids (-1) add nothing.
        weight: E (default: the key embedding's)."""
        weight = self.key_embedding.weight if weight is None else weight
        n = self.store.entries if rows is None else rows.shape[0]
        out = []
        for start in range(0, n, block):  # the [R, n, K] sums, a block of entries at a time
            part = (slice(start, start + block) if rows is None else rows[start:start + block].numpy())
            ids = torch.from_numpy(np.array(self.store.key_ids[part])).long().to(weight.device)  # [R, n]
            offsets = torch.arange(ids.shape[1], device=ids.device) * self.key_vocab
            emb = torch.nn.functional.embedding((ids + offsets).clamp(min=0), weight) * (ids >= 0).unsqueeze(-1)
            out.append(torch.nn.functional.normalize(emb.sum(1).float(), dim=-1))
        return torch.cat(out) if len(out) != 1 else out[0]

    def value_vectors(self, idx: torch.Tensor, device) -> torch.Tensor:
        """idx [T, k] (valid entries) -> [T, k, value_dim]."""
        raw = torch.from_numpy(np.array(self.store.values[idx.reshape(-1).numpy()]))
        raw = raw.view(*idx.shape, -1).to(device)  # [T, k, M]
        if self.store.meta["values"] != "tokens":
            return raw.float()
        emb = self.value_embedding(raw.long().clamp(min=0)) * (raw >= 0).unsqueeze(-1)  # [T, k, M, e]
        return emb.flatten(2)

    def read(self, x, context, extra):
        o = self.spec.options
        q = self.query(x, context)  # [T, K]
        own = own_passage(self.store, o, context, self.settings.context_window)
        if o.query == "learned":
            idx, sel = self.learned_search(q, own)
        else:
            if extra is not None:  # the model's search, done once for every layer (ContextSearch)
                idx = extra.cpu()
            else:
                self.searched_rows += q.shape[0]
                idx = self.store.search(q, o.topk, own)
            sel = torch.from_numpy(np.array(self.store.keys[idx.clamp(min=0).reshape(-1).numpy()]))
            sel = sel.view(*idx.shape, -1).to(q.device)  # [T, k, K]
        found = (idx >= 0).to(q.device)
        idx = idx.clamp(min=0)
        scores = (q.unsqueeze(1) * sel).sum(-1)  # [T, k], differentiable in q (and in learned keys)
        scores = scores.masked_fill(~found, float("-inf"))
        values = self.value_vectors(idx, q.device)  # [T, k, value_dim]
        if o.null:  # the null entry: its score, a zero value
            scores = torch.cat([scores, (q @ self.null_key.float()).unsqueeze(1)], dim=1)
            values = torch.cat([values, values.new_zeros(values.shape[0], 1, values.shape[2])], dim=1)
        w = torch.softmax(scores / o.temperature, dim=-1).nan_to_num(0.0)  # none found: reads 0
        out = (w.unsqueeze(-1) * values).sum(1)  # [T, value_dim]
        if o.query == "learned" and self.training and torch.is_grad_enabled():
            out = AttachLoss.apply(out, o.contrastive * self.contrastive_loss(q, context, idx, own))
        return out

    def learned_search(self, q: torch.Tensor, own: Optional[torch.Tensor]):
        """The top-k entries of learned keys ([T, k], -1: none; with `own`, not of the token's own
        passage) and those keys [T, k, K] recomputed from the current E, differentiable in E.
        reindex=0: every key scored; else the candidates of the snapshot's index."""
        o = self.spec.options
        k = o.topk + (EXCLUDE_SLACK if own is not None else 0)
        self.searched_rows += q.shape[0]
        with torch.no_grad():
            if o.reindex:
                idx = self.snapshot_index().search(q, k)
            else:
                keys = self.learned_keys()  # [N, K]
                idx = torch.topk(q @ keys.T, min(k, keys.shape[0]), dim=1).indices.cpu()
        if own is not None:
            idx = self.store.skip_own(idx, own, o.topk)
        keys = self.learned_keys(idx.clamp(min=0).reshape(-1)).view(*idx.shape, -1)
        return idx, keys.to(q.device)

    def snapshot_index(self):
        """The index of the keys of E as it was last indexed (built on first use after a re-index
        or a load)."""
        if self._snapshot_index is None:
            with torch.no_grad():
                keys = self.learned_keys(weight=self.indexed_key_embedding)
            self._snapshot_index = snapshot_search(keys.cpu().numpy(), nprobe=self.spec.options.nprobe)
        return self._snapshot_index

    def after_step(self, iteration: int) -> Optional[str]:
        """Every reindex-th step: E's snapshot refreshed and the index rebuilt; a line for the log."""
        o = self.spec.options
        if not o.reindex or iteration % o.reindex:  # reindex > 0 only with query=learned
            return None
        start = time.perf_counter()
        self.indexed_key_embedding.copy_(self.key_embedding.weight.detach())
        self._snapshot_index = None
        index = self.snapshot_index()
        return (f" re-indexed the learned keys of IO function {self.spec.name!r} after step {iteration}: "
                f"{self.store.entries} entries, IVF {index.meta['nlist']} cells, "
                f"{time.perf_counter() - start:.1f} s")

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        if getattr(self, "_snapshot_index", None) is not None:
            self._snapshot_index = None  # a loaded snapshot: the next search rebuilds the index from it

    def teacher(self, context: torch.Tensor, own: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per token the entry whose frozen key is the token's own n-gram code (the `context` query's
        exact hit; with `own`, not in the token's own passage), or -1 where no entry has that window."""
        q_ctx = self.encoder(context_ids(context, self.settings.context_window))
        idx = self.store.search(q_ctx, 1, own)[:, 0]  # [T]
        hit = torch.from_numpy(np.array(self.store.keys[idx.clamp(min=0).numpy()]))
        exact = (idx >= 0) & ((hit * q_ctx.cpu()).sum(-1) > 1 - 1e-4)  # unit keys: the same code
        return torch.where(exact, idx, torch.full_like(idx, -1))

    def contrastive_loss(self, q: torch.Tensor, context: torch.Tensor, retrieved: torch.Tensor,
                         own: Optional[torch.Tensor] = None) -> torch.Tensor:
        """InfoNCE of each token's query against its teacher entry, the other tokens' teachers and
        the retrieved entries as negatives (mean over the tokens with a teacher; 0 without any).
        Records recall@k (the teacher among the k retrieved) and the loss for the log."""
        teacher = self.teacher(context, own)  # [T]
        has = teacher >= 0
        if not bool(has.any()):
            return q.sum() * 0.0
        self.log["recall"][0] += float((retrieved[has] == teacher[has, None]).any(1).sum())
        self.log["recall"][1] += float(has.sum())
        candidates, inverse = torch.unique(torch.cat([teacher[has], retrieved[has].reshape(-1)]), return_inverse=True)
        keys = self.learned_keys(candidates)  # [C, K]
        logits = q[has.to(q.device)] @ keys.T / self.spec.options.temperature  # [T', C]
        target = inverse[:int(has.sum())].to(q.device)
        loss = torch.nn.functional.cross_entropy(logits, target)
        self.log["contrastive_loss"][0] += float(loss.detach())
        self.log["contrastive_loss"][1] += 1
        return loss

    def report(self) -> dict[str, tuple[float, float]]:
        k = self.spec.options.topk
        names = {"recall": f"flaming_io_{self.spec.name}_recall@{k}",
                 "contrastive_loss": f"flaming_io_{self.spec.name}_contrastive_loss"}
        out = {names[key]: tuple(value) for key, value in self.log.items() if value[1]}
        self.log = {key: [0.0, 0.0] for key in self.log}
        return out

    def source_identity(self) -> dict:
        return {**super().source_identity(), **self.store.identity()}

    def check_source(self, recorded: dict) -> None:
        check_identity(recorded, self.store, swap=self.settings.source_swap, where=self.spec.where())


def own_passage(store: Store, options: StoreOptions, context: torch.Tensor, window: int) -> Optional[torch.Tensor]:
    """[T] fingerprints of the tokens' own last L ids, the passages exclude=1 skips (None: off)."""
    if not options.exclude:
        return None
    return passage_fingerprint(context_ids(context, window)[:, -store.passage_ids:])


class ContextSearch(ContextProvider):
    """A global-bank `context`-query store searched once per forward pass for all its tokens: the
    entry indices go into the context, where every layer's read finds them."""

    def __init__(self, spec: IOSpec, settings: IOSettings):
        o = spec.options
        self.spec, self.window = spec, settings.context_window
        self.store = open_store(spec.source, where=spec.where(), nprobe=o.nprobe, ef_search=o.ef_search)
        self.encoder = NgramEncoder(self.store.meta["encoder"])
        self.columns = {spec.name: o.topk}
        self.rows = 0  # token searches done (the benchmark and tests read it)

    @torch.no_grad()
    def compute(self, input_ids, context, *, dtype, attention_mask=None, cache=None, documents=None):
        b, s, c = context.shape  # the ids windows honour documents already
        rows = context.reshape(b * s, c)
        q = self.encoder(context_ids(rows, self.window))
        self.rows += q.shape[0]
        own = own_passage(self.store, self.spec.options, rows, self.window)
        idx = self.store.search(q.to(input_ids.device), self.spec.options.topk, own)
        return {self.spec.name: idx.view(b, s, -1)}


def reuses_search(spec: IOSpec, settings: IOSettings) -> bool:
    """A global-bank `context`-query store, whose search the model does once for every layer."""
    return settings.reuse_search and spec.bank == "global" and spec.options.query == "context"


class StoreKind(IOKind):
    name = "store"
    options = StoreOptions
    run_options = ("nprobe", "ef_search")

    def validate(self, spec):
        o = spec.options
        for key in ("topk",):
            if getattr(o, key) < 1:
                raise IOSourceError(f"{spec.where()}: {key}={getattr(o, key)} must be >= 1. Fix: e.g. {key}=4.")
        for key in ("embed_dim", "nprobe", "ef_search"):
            if getattr(o, key) < 0:
                raise IOSourceError(f"{spec.where()}: {key}={getattr(o, key)} must be >= 0 (0: the default).")
        if o.temperature <= 0:
            raise IOSourceError(f"{spec.where()}: temperature={o.temperature} must be > 0. Fix: e.g. temperature=1.")
        if o.null not in (0, 1) or o.contrastive < 0:
            raise IOSourceError(f"{spec.where()}: null={o.null} must be 0 or 1 and contrastive={o.contrastive} >= 0.")
        if o.exclude not in (0, 1):
            raise IOSourceError(f"{spec.where()}: exclude={o.exclude} must be 0 or 1.")
        if o.reindex < 0 or (o.reindex and o.query != "learned"):
            raise IOSourceError(f"{spec.where()}: reindex={o.reindex} must be >= 0, and re-indexes learned keys "
                                "(query=learned) only. Fix: e.g. query=learned,reindex=50, or reindex=0.")

    def check_source(self, spec, settings):
        store = open_store(spec.source, where=spec.where(), nprobe=spec.options.nprobe,
                           ef_search=spec.options.ef_search)
        meta, o = store.meta, spec.options
        if store.entries < o.topk:
            raise IOSourceError(f"{spec.where()}: the store has {store.entries} entries, fewer than topk={o.topk}. "
                                "Fix: lower topk or build a larger store.")
        vocab = meta["encoder"]["vocab_size"]
        if vocab > settings.vocab_size:
            raise IOSourceError(f"{spec.where()}: the store was built for a vocabulary of {vocab} ids, the model "
                                f"has {settings.vocab_size}. Fix: build the store with the model's tokenizer.")
        n = meta["encoder"]["n"]
        if o.query == "learned" and store.key_ids is None:
            raise IOSourceError(f"{spec.where()}: query=learned needs the entries' key ids, which this store "
                                "predates. Fix: rebuild it with tools/build_flaming_store.py.")
        if o.query == "learned" and not o.reindex and store.entries > LEARNED_MAX_ENTRIES:
            raise IOSourceError(f"{spec.where()}: query=learned with reindex=0 recomputes and searches its "
                                f"{store.entries} learned keys at every forward pass, which Neon does up to "
                                f"{LEARNED_MAX_ENTRIES} entries. Fix: reindex=N (e.g. reindex=50: an index of "
                                "the keys rebuilt every 50 steps), or a smaller store.")
        if o.reindex:
            try:
                faiss()
            except IOSourceError:
                raise IOSourceError(f"{spec.where()}: reindex={o.reindex} indexes the learned keys with faiss, which "
                                    "is not installed. Fix: pip install faiss-cpu (requirements.txt pins the tested "
                                    f"version), or reindex=0 for a store of at most {LEARNED_MAX_ENTRIES} entries."
                                    ) from None
        if o.exclude and not store.passage_ids:
            raise IOSourceError(f"{spec.where()}: exclude=1 needs the store's passage fingerprints. Fix: rebuild it "
                                "with tools/build_flaming_store.py --passage-ids L (e.g. 8).")
        if o.exclude and store.passage_ids > settings.context_window:
            raise IOSourceError(f"{spec.where()}: exclude=1 compares the last {store.passage_ids} ids (the store's "
                                f"--passage-ids) but flaming_io_context_window={settings.context_window}. Fix: set "
                                f"flaming_io_context_window >= {store.passage_ids}.")
        if o.query in ("context", "learned") and n > settings.context_window:
            raise IOSourceError(f"{spec.where()}: its encoder reads n={n} ids but flaming_io_context_window="
                                f"{settings.context_window}. Fix: set flaming_io_context_window >= {n}.")

    def build(self, spec, settings):
        return StoreFunction(spec, settings)

    def providers(self, specs, settings):
        return [ContextSearch(s, settings) for s in specs if s.kind == self.name and reuses_search(s, settings)]

    def context_columns(self, specs, settings):
        return {s.name: s.options.topk for s in specs if s.kind == self.name and reuses_search(s, settings)}

    def macs(self, spec, settings):
        """[d * K] + k * K + k * V + V * d: [W_q x if the query is learned], the k rescored keys,
        the weighted sum of their values, W_out (V: the value width, value_width * embed_dim for
        token values). The search runs on the index, off the matmul count (query='learned': an
        exact search over N learned keys with reindex=0, N * K more per token, counted here)."""
        with open(os.path.join(spec.source, META)) as f:
            meta = json.load(f)
        d, key_dim, k = settings.hidden_size, meta["key_dim"], spec.options.topk
        value = meta["value_width"] * ((spec.options.embed_dim or d) if meta["values"] == "tokens" else 1)
        query = spec.options.query
        learned_search = meta["entries"] * key_dim if query == "learned" and not spec.options.reindex else 0
        return ((d * key_dim if query in ("hidden", "learned") else 0) + learned_search + k * key_dim + k * value
                + value * d)


def swap_store(model: torch.nn.Module, name: str, path: str) -> int:
    """Attach another store to every StoreFunction named `name` (evaluation or generation without
    retraining: the knowledge lives outside the weights), and to the model's once-per-forward
    search of it. Its encoder and value layout must match the current store's. Returns the number
    of functions and searches swapped."""
    users = [m for m in model.modules() if isinstance(m, StoreFunction) and m.spec.name == name]
    users += [p for m in model.modules() for p in (getattr(m, "io_providers", None) or ())
              if isinstance(p, ContextSearch) and p.spec.name == name]
    if not users:
        raise IOSourceError(f"no store IO function named {name!r} in the model")
    where = users[0].spec.where()
    o = users[0].spec.options
    new = open_store(path, where=where, nprobe=o.nprobe, ef_search=o.ef_search)
    old = users[0].store.meta
    for key in ("encoder", "values", "value_width", "key_dim"):
        if new.meta[key] != old[key]:
            _fail(where, path, f"has {key}={new.meta[key]!r}, the attached store has {old[key]!r}",
                  "swap in a store built with the same encoder and values")
    for user in users:
        user.store = new
    return len(users)
