"""FlamingMoE IO functions in the Hugging Face reference: routed functions that read from outside
the model (a key-value store on disk, a Python callable, a frozen causal LM).

Copied next to an exported model with configuration_neon.py and modeling_neon.py; like them it
imports nothing from the neon package. It computes, from the equations, what neon/flaming/{io,
store,encoder,callables,frozen_model}.py compute in megatron (tests/tools/test_convert_to_hf_io.py
compares the two).

An IO function g is an entry of a bank after its learned functions: `bank=layer` (the default)
the per-layer bank's after its F (router outputs F, F + 1, ...), one function per layer;
`bank=global` the global bank's after its G (router outputs G, G + 1, ...), one function held by
the model and shared by every layer (G may be 0: a bank of IO functions only). Besides the
routed tokens' x' [T, D] it reads their context rows

    c_t = (position_t, sequence_t, id_{t-W+1}, ..., id_t)        int64, -1 before the sequence start
    g(x_t, c_t) = W_out read(q(x_t, c_t), c_t)

Context in this reference (no document packing): sequence_t is the batch row, position_t the
token's position id (the one RoPE uses: position_ids, or the cache length + offset), and the ids
are those of its batch row up to t, including the tokens before it that are already in the KV
cache (kept with the cache, `IOCacheState`); padding (attention_mask 0) reads as -1.

Kinds (config strings as in Neon: "name=...,kind=store|callable|model,source=...,key=value"):

  store     q = encoder(id_{t-n+1..t}) (query=context, the store's frozen n-gram encoder:
            normalize(sum_j s_j E[id_{t-n+1+j}])) or q = W_q x (query=hidden);
            (s, i) = exact top-k of <q, key_j> over all N keys (keys.f32, memory-mapped, blocks);
            w = softmax(s / T); read = sum_k w_k value_{i_k},
            value = concat_m Emb[id_m] (own embedding; -1 -> 0) or the stored vector
  callable  read = concat_m Emb[fn(c)_m] (returns=tokens) or fn(c) (returns=vectors), where fn is
            `module:function`, called once per bank forward with the routed tokens' rows [T, 2 + W]
  model     read = h^A_k(t): the frozen causal LM in `source` (AutoModelForCausalLM), its hidden
            state at layer k, on this row's ids (no re-tokenization: the vocabularies must agree).
            It runs once per forward (all layers and banks share it) and keeps its own KV cache
            with the Neon model's cache, so cached generation feeds it only the new tokens.

Sources are checked when the model is built (a missing store, truncated file, unimportable
callable, missing or non-causal model directory is an `IOSourceError` naming the function and the
source); with `flaming_io_sources` in the config (written by tools/convert_to_hf.py) the store's
content hash and the frozen model's hash must be the recorded ones unless flaming_io_store_swap.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import json
import os

import numpy as np
import torch
from torch import nn

CONTEXT_FIXED_COLUMNS = 2  # position, sequence; then the W ids
SEARCH_BLOCK_ROWS = 65536
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


class IOSourceError(ValueError):
    """An IO function's source cannot be used; the message names the function, the source and the fix."""


@dataclasses.dataclass(frozen=True)
class IOSpec:
    name: str
    kind: str
    source: str
    query: str = "context"
    topk: int = 4
    temperature: float = 1.0
    returns: str = "tokens"
    width: int = 1
    embed_dim: int = 0
    layer: int = -1
    tokenizer: str = ""
    bank: str = "layer"  # 'layer' | 'global'

    def where(self) -> str:
        return f"IO function {self.name!r} ({self.kind} {self.source!r})"


def parse_io_spec(text: str) -> IOSpec:
    """'name=facts,kind=store,source=/path,topk=2' -> IOSpec."""
    types = {f.name: f.type for f in dataclasses.fields(IOSpec)}
    values = {}
    for part in (p.strip() for p in str(text).split(",") if p.strip()):
        key, _, value = part.partition("=")
        key = key.strip()
        if key not in types:
            raise IOSourceError(f"flaming_io_functions entry {text!r}: unknown key {key!r}. Fix: use keys "
                                f"from {sorted(types)}.")
        kind = types[key]
        try:
            values[key] = int(value) if kind == "int" else float(value) if kind == "float" else value.strip()
        except ValueError:
            raise IOSourceError(f"flaming_io_functions entry {text!r}: {key}={value!r} is not a number.") from None
    for key in ("name", "kind", "source"):
        if not values.get(key):
            raise IOSourceError(f"flaming_io_functions entry {text!r} has no {key}. Fix: add '{key}=...'.")
    spec = IOSpec(**values)
    if spec.kind not in ("store", "callable", "model"):
        raise IOSourceError(f"{spec.where()}: kind={spec.kind!r} is not 'store', 'callable' or 'model'.")
    if spec.bank not in ("layer", "global"):
        raise IOSourceError(f"{spec.where()}: bank={spec.bank!r} is not 'layer' or 'global'.")
    return spec


def io_specs(config, bank: str | None = None) -> list[IOSpec]:
    """The IO functions (all, or those of `bank`: 'layer' | 'global'), in config order."""
    specs = [parse_io_spec(t) for t in (getattr(config, "flaming_io_functions", None) or ())]
    return [s for s in specs if bank is None or s.bank == bank]


# --- the token context -------------------------------------------------------------------------


def token_context(ids: torch.Tensor, history: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """ids [b, s] (-1: padding), history [b, W - 1] (the ids before them, -1: none), positions
    [b, s] -> context [b, s, 2 + W]: (position, batch row, id_{t-W+1} .. id_t)."""
    b, s = ids.shape
    window = history.shape[1] + 1
    windows = torch.cat([history, ids], dim=1).unfold(1, window, 1)  # [b, s, W]
    rows = torch.arange(b, device=ids.device)[:, None].expand(b, s)
    return torch.cat([positions.long().expand(b, s)[..., None], rows[..., None], windows], dim=-1)


class IOCacheState:
    """What cached generation must remember besides the attention keys and values: the last
    W - 1 ids of every row (the context window) and each frozen model's own KV cache.
    Kept on the Neon model's cache object (attribute `neon_io`)."""

    def __init__(self, history: torch.Tensor):
        self.history = history  # [b, W - 1]
        self.frozen_caches: dict = {}  # source -> the frozen model's Cache

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Rows follow beam search's choice (NeonForCausalLM._reorder_cache)."""
        self.history = self.history[beam_idx.to(self.history.device)]
        for cache in self.frozen_caches.values():
            cache.reorder_cache(beam_idx)


# --- store -------------------------------------------------------------------------------------


class NgramEncoder:
    """Frozen: ids [T, n] (-1: none) -> keys [T, K] = normalize(sum_j s_j E[id_j]) (the store's
    encoder, recorded in its meta.json: a table from torch's CPU generator or a .npy file)."""

    def __init__(self, desc: dict):
        self.n, k, v, table = desc["n"], desc["key_dim"], desc["vocab_size"], desc["table"]
        if table.startswith("random:"):
            seed = int(table[7:])
            self.table = torch.randn(v, k, generator=torch.Generator().manual_seed(seed), device="cpu") / k ** 0.5
        elif table.startswith("path:"):
            seed = 0
            self.table = torch.from_numpy(np.load(table[5:]).astype(np.float32))
            if tuple(self.table.shape) != (v, k):
                raise IOSourceError(f"store encoder table {table[5:]} has shape {tuple(self.table.shape)}, "
                                    f"expected [{v}, {k}]. Fix: restore the table the store was built with.")
        else:
            raise IOSourceError(f"store encoder table {table!r}: expected 'random:<seed>' or 'path:<file.npy>'")
        gen = torch.Generator().manual_seed(seed + 1)
        self.signs = torch.randint(0, 2, (self.n, k), generator=gen, device="cpu").float() * 2 - 1

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids[:, -self.n:].long().cpu()
        present = (ids >= 0).unsqueeze(-1).float()
        vecs = self.table[ids.clamp(min=0)] * present * self.signs  # [T, n, K]
        return nn.functional.normalize(vecs.sum(dim=1), dim=-1)


def open_store(spec: IOSpec) -> tuple[dict, np.memmap, np.memmap]:
    """(meta, keys [N, K] float32, values [N, M]) memory-mapped; a missing or truncated store fails."""
    path = spec.source
    meta_path = os.path.join(path, "meta.json")
    if not os.path.isfile(meta_path):
        raise IOSourceError(f"{spec.where()}: store {path!r} does not exist (no meta.json). Fix: put the store "
                            "there, or give its path in flaming_io_functions (from_pretrained(..., "
                            "flaming_io_functions=[...])).")
    with open(meta_path) as f:
        meta = json.load(f)
    n, k, m = meta["entries"], meta["key_dim"], meta["value_width"]
    for name, expect in (("keys.f32", n * k * 4), ("values.bin", n * m * 4)):
        file = os.path.join(path, name)
        size = os.path.getsize(file) if os.path.isfile(file) else -1
        if size != expect:
            raise IOSourceError(f"{spec.where()}: store {path!r} has {name} of {size} bytes, expected {expect} "
                                "(truncated or missing file). Fix: rebuild the store.")
    vdtype = np.int32 if meta["values"] == "tokens" else np.float32
    keys = np.memmap(os.path.join(path, "keys.f32"), dtype=np.float32, mode="r", shape=(n, k))
    values = np.memmap(os.path.join(path, "values.bin"), dtype=vdtype, mode="r", shape=(n, m))
    return meta, keys, values


@torch.no_grad()
def exact_topk(q: torch.Tensor, keys: np.ndarray, k: int) -> torch.Tensor:
    """q [Q, K], keys [N, K] -> indices [Q, k] of the k largest inner products (exact, in blocks)."""
    q = q.detach().float().cpu()
    best_s, best_i = q.new_full((q.shape[0], 0), float("-inf")), torch.zeros(q.shape[0], 0, dtype=torch.long)
    for start in range(0, keys.shape[0], SEARCH_BLOCK_ROWS):
        block = torch.from_numpy(np.array(keys[start:start + SEARCH_BLOCK_ROWS]))
        s = q @ block.T
        idx = torch.arange(start, start + block.shape[0]).expand_as(s)
        cand_s, cand_i = torch.cat([best_s, s], 1), torch.cat([best_i, idx], 1)
        top = torch.topk(cand_s, min(k, cand_s.shape[1]), dim=1)
        best_s, best_i = top.values, cand_i.gather(1, top.indices)
    return best_i


def embed_ids(embedding: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    """ids [T, ..., m] (-1: none) -> [T, ..., m * e] (none: zeros)."""
    return (embedding(ids.clamp(min=0)) * (ids >= 0).unsqueeze(-1)).flatten(-2)


class StoreFunction(nn.Module):
    def __init__(self, config, spec: IOSpec):
        super().__init__()
        self.spec = spec
        self.meta, self.keys, self.values = open_store(spec)
        if self.meta["encoder"]["vocab_size"] != config.vocab_size:
            raise IOSourceError(f"{spec.where()}: the store was built for vocab_size "
                                f"{self.meta['encoder']['vocab_size']}, the model has {config.vocab_size}.")
        self._encoder = None  # built at first use (the tables are CPU tensors, not weights)
        D = config.hidden_size
        if spec.query == "hidden":
            self.query_proj = nn.Linear(D, self.meta["key_dim"], bias=False)  # W_q
        if self.meta["values"] == "tokens":
            embed = spec.embed_dim or D
            self.value_embedding = nn.Embedding(self.meta["encoder"]["vocab_size"], embed)
            value_dim = self.meta["value_width"] * embed
        else:
            value_dim = self.meta["value_width"]
        self.out_proj = nn.Linear(value_dim, D, bias=False)  # W_out

    def identity(self) -> dict:
        return {"entries": self.meta["entries"], "key_dim": self.meta["key_dim"],
                "content_sha256": self.meta["content_sha256"]}

    def forward(self, x: torch.Tensor, context: torch.Tensor, states: dict) -> torch.Tensor:
        """x [T, D], context [T, 2 + W] -> [T, D]."""
        if self.spec.query == "context":
            if self._encoder is None:
                self._encoder = NgramEncoder(self.meta["encoder"])
            q = self._encoder(context[:, CONTEXT_FIXED_COLUMNS:]).to(x.device)
        else:
            q = self.query_proj(x).float()
        idx = exact_topk(q, self.keys, self.spec.topk)  # [T, k]
        flat = idx.reshape(-1).numpy()
        sel = torch.from_numpy(np.array(self.keys[flat])).view(*idx.shape, -1).to(q.device)  # [T, k, K]
        w = torch.softmax((q.unsqueeze(1) * sel).sum(-1) / self.spec.temperature, dim=-1)  # [T, k]
        raw = torch.from_numpy(np.array(self.values[flat])).view(*idx.shape, -1).to(q.device)  # [T, k, M]
        vals = embed_ids(self.value_embedding, raw.long()) if self.meta["values"] == "tokens" else raw.float()
        read = (w.unsqueeze(-1) * vals).sum(1)
        return self.out_proj(read.to(self.out_proj.weight.dtype))


# --- callable ----------------------------------------------------------------------------------


def resolve_callable(spec: IOSpec):
    module, sep, name = spec.source.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name, None) if sep and module and name else None
    except Exception as e:  # noqa: BLE001 - any import failure is the source's
        raise IOSourceError(f"{spec.where()}: cannot import module {module!r} ({type(e).__name__}: {e}). Fix: "
                            "put it on PYTHONPATH or correct the name.") from None
    if not callable(fn):
        raise IOSourceError(f"{spec.where()}: {spec.source!r} is not an importable 'module:function'. Fix: name "
                            "a function defined in an importable module.")
    return fn


class CallableFunction(nn.Module):
    def __init__(self, config, spec: IOSpec):
        super().__init__()
        self.spec, self.fn = spec, resolve_callable(spec)
        D = config.hidden_size
        if spec.returns == "tokens":
            embed = spec.embed_dim or D
            self.embedding = nn.Embedding(config.vocab_size, embed)
            self.out_proj = nn.Linear(spec.width * embed, D, bias=False)
        else:
            self.out_proj = nn.Linear(spec.width, D, bias=False)

    def forward(self, x: torch.Tensor, context: torch.Tensor, states: dict) -> torch.Tensor:
        with torch.no_grad():
            out = self.fn(context.detach().cpu())
        out = torch.as_tensor(out if torch.is_tensor(out) else np.asarray(out))
        if tuple(out.shape) != (context.shape[0], self.spec.width):
            raise RuntimeError(f"{self.spec.where()} returned shape {tuple(out.shape)}, expected "
                               f"{[context.shape[0], self.spec.width]} (one row per context row)")
        out = out.to(x.device)
        read = embed_ids(self.embedding, out.long()) if self.spec.returns == "tokens" else out.float()
        return self.out_proj(read.to(self.out_proj.weight.dtype))


# --- model -------------------------------------------------------------------------------------


def frozen_config(spec: IOSpec, vocab_size: int):
    """The frozen model's config, checked: a local causal-LM directory, a layer in range, a
    vocabulary that holds Neon's ids, no re-tokenization."""
    where, path = spec.where(), spec.source
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise IOSourceError(f"{where}: {path!r} is not a directory with a config.json. Fix: put the frozen model "
                            "there, or give its directory in flaming_io_functions.")
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    cfg = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=True)
    encoder_family = cfg.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES  # causal only with is_decoder
    causal = ((cfg.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
               and (not encoder_family or getattr(cfg, "is_decoder", False)))
              or "AutoModelForCausalLM" in (getattr(cfg, "auto_map", None) or {}))
    if not causal or getattr(cfg, "is_encoder_decoder", False):
        raise IOSourceError(f"{where}: model_type {cfg.model_type!r} is not a causal LM. Fix: use a decoder-only "
                            "causal LM directory.")
    if not -cfg.num_hidden_layers - 1 <= spec.layer <= cfg.num_hidden_layers:
        raise IOSourceError(f"{where}: layer={spec.layer} is outside 0..{cfg.num_hidden_layers}.")
    if spec.tokenizer:
        frozen_tok = os.path.join(path, "tokenizer.model")
        same = (os.path.isfile(frozen_tok) and os.path.isfile(spec.tokenizer)
                and open(frozen_tok, "rb").read() == open(spec.tokenizer, "rb").read())
        if not same:
            raise IOSourceError(f"{where}: tokenizer={spec.tokenizer!r} differs from the frozen model's "
                                "tokenizer.model: re-tokenization between two vocabularies is not built in the "
                                "Hugging Face export (only in Neon's training). Fix: use a frozen model with "
                                "Neon's vocabulary.")
    if vocab_size > cfg.vocab_size:
        raise IOSourceError(f"{where}: Neon's vocab_size {vocab_size} exceeds the frozen model's "
                            f"{cfg.vocab_size}. Fix: use a frozen model with Neon's vocabulary.")
    return cfg


def model_identity(path: str) -> dict:
    """sha256 over config.json and the weight files (what Neon's checkpoints record)."""
    h = hashlib.sha256()
    for name in ["config.json", *sorted(f for f in os.listdir(path) if f.endswith(WEIGHT_SUFFIXES))]:
        h.update(name.encode())
        with open(os.path.join(path, name), "rb") as f:
            while block := f.read(1 << 24):
                h.update(block)
    with open(os.path.join(path, "config.json")) as f:
        hidden = json.load(f).get("hidden_size")
    return {"sha256": h.hexdigest(), "hidden_size": hidden}


class ModelFunction(nn.Module):
    """g(x, c) = W_out h^A_k: the routed tokens' frozen states (computed once per forward by FrozenModels)."""

    def __init__(self, config, spec: IOSpec):
        super().__init__()
        self.spec = spec
        self.out_proj = nn.Linear(frozen_config(spec, config.vocab_size).hidden_size, config.hidden_size,
                                  bias=False)

    def identity(self) -> dict:
        return {"layer": self.spec.layer, **model_identity(self.spec.source)}

    def forward(self, x: torch.Tensor, context: torch.Tensor, states: dict) -> torch.Tensor:
        return self.out_proj(states[(self.spec.source, self.spec.layer)].to(self.out_proj.weight.dtype))


class FrozenModels:
    """The frozen causal LMs of the `model` functions, one per source, outside the module tree (not
    in the state dict or parameters); loaded at the first forward, in the Neon model's dtype and
    device, eval mode, requires_grad False."""

    def __init__(self, specs: list[IOSpec]):
        self.layers: dict[str, list[int]] = {}
        for s in specs:
            if s.kind == "model":
                self.layers.setdefault(s.source, []).append(s.layer)
        self.models: dict = {}

    def _model(self, source: str, like: torch.Tensor):
        if source not in self.models:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(source, local_files_only=True, trust_remote_code=True,
                                                         dtype=like.dtype)
            self.models[source] = model.to(like.device).eval().requires_grad_(False)
        return self.models[source]

    @torch.no_grad()
    def states(self, ids, attention_mask, state: IOCacheState | None, like: torch.Tensor) -> dict:
        """ids [b, s] (the new tokens) -> {(source, layer): [b * s, H]}; with a cache state the frozen
        model reads its own KV cache of the earlier tokens and adds these."""
        out = {}
        for source, layers in self.layers.items():
            model = self._model(source, like)
            past = state.frozen_caches.get(source) if state is not None else None
            # transformers 5 names the cache argument `cache`; older (remote) code `past_key_values`
            cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
            res = model(input_ids=ids, attention_mask=attention_mask, use_cache=state is not None,
                        output_hidden_states=True, **{cache_arg: past})
            if state is not None:
                state.frozen_caches[source] = getattr(res, "cache", None) or res.past_key_values
            for k in layers:
                h = res.hidden_states[k]
                out[(source, k)] = h.reshape(-1, h.shape[-1])
        return out


def build_io_function(config, spec: IOSpec) -> nn.Module:
    cls = {"store": StoreFunction, "callable": CallableFunction, "model": ModelFunction}[spec.kind]
    fn = cls(config, spec)
    check_identity(config, fn)
    return fn


def check_identity(config, fn: nn.Module) -> None:
    """The store / frozen model must be the one recorded at export (flaming_io_sources), unless
    flaming_io_store_swap (then only the store's key_dim / the model's hidden size must agree)."""
    recorded = (getattr(config, "flaming_io_sources", None) or {}).get(fn.spec.name)
    if not recorded or fn.spec.kind == "callable":
        return
    now = fn.identity()
    same = ["key_dim"] if fn.spec.kind == "store" else ["hidden_size"]
    if not getattr(config, "flaming_io_store_swap", False):
        same = ["entries", "content_sha256"] if fn.spec.kind == "store" else ["sha256", "layer"]
    wrong = ", ".join(f"{k} {recorded.get(k)!r}, now {now.get(k)!r}" for k in same if recorded.get(k) != now.get(k))
    if wrong:
        raise IOSourceError(f"{fn.spec.where()}: differs from the source the model was exported with "
                            f"({recorded.get('path')!r}: {wrong}). "
                            "Fix: attach the original source, or load with flaming_io_store_swap=True to use "
                            "this one.")
