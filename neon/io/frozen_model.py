"""`model`: a frozen causal LM (any local directory `transformers` loads) as a FlamingMoE IO function.

    "name=anchor,kind=model,source=/models/mistral_small,layer=-1"
    "name=anchor,kind=model,source=/models/other_vocab,layer=4,tokenizer=/data/neon_tok.model"

The composition of an anchor model with an augmenting one, as in CALM (Bansal et al., 2024),
routed per token:

    f(x_t, c_t) = W_out h^A_k(t)          h^A_k: the frozen model's hidden state at layer k
                                          (0 = embeddings, L = last layer; -1: the last)

How it runs (one frozen model per source and process, shared by every layer and bank):
  - `FrozenModels`, the kind's context provider, loads the `transformers` model at its first
    forward (AutoModelForCausalLM, local_files_only) in the dtype of the model's hidden states,
    on the input ids' device, eval mode, requires_grad False, held outside the module tree: its
    weights are in no optimizer and no checkpoint.
  - Once per forward pass (under no_grad) it runs on the input ids, causally (its own causal
    mask: state t sees tokens <= t). The states of each function's layer are packed bit-exactly
    into int64 context columns (`pack_states`, as float32: exact for bf16 and fp16 states too), so
    they travel with the context: through megatron's dispatcher (only the routed tokens' rows
    move), activation recompute and the pipeline schedule, never as state between micro-batches.
    In cached generation it reads and extends its own KV cache, kept with the model's cache.
  - `ModelFunction.read` unpacks its columns for its routed tokens; W_out is learned.

Vocabularies. Without `tokenizer=`, the Neon ids are fed to the frozen model as they are (the two
models share a vocabulary; Neon's vocab_size must not exceed the frozen model's). With
`tokenizer=<Neon's sentencepiece model>` and a different vocabulary in `<source>/tokenizer.model`,
each sequence is re-tokenized (`Retokenizer`): the Neon pieces are joined into text, the frozen
tokenizer encodes it, and Neon token t gets the state of the last frozen token that ends at or
before t ends (zeros if none). The frozen tokenization is of the whole sequence; sentencepiece
does not merge across whitespace, so a frozen token that ends at or before t ends depends on the
characters of t's word up to there and, inside a word, may depend on how the word continues. That
within-word effect is the only way later text reaches token t. Re-tokenization needs the whole
sequence at each forward (generation with use_cache=False).

Identity: a checkpoint records the directory and the sha256 of config.json and the weight files
(`model_identity`); loading with another model is an error (flaming_io_store_swap accepts one of
the same hidden size).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import json
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch

from neon.errors import IOSourceError
from neon.io.base import ContextProvider, IOFunction, IOKind, IOSettings, IOSpec

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
PACK_BYTES = 8  # int64 context columns
PACK_DTYPE = torch.float32


@dataclass(frozen=True)
class ModelOptions:
    layer: int = -1
    tokenizer: str = ""


# --- the directory: config, causality, identity ----------------------------------------------


def frozen_config(spec: IOSpec):
    """The frozen model's `transformers` config, checked: a directory, a causal LM, a valid layer."""
    return _frozen_config(spec.source, spec.where(), spec.options.layer)


@functools.lru_cache(maxsize=32)
def _frozen_config(path: str, where: str, layer: int):
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
        raise IOSourceError(f"{where}: {path!r} is not a directory with a config.json. Fix: point source= at a local "
                            "model directory (save_pretrained or tools/convert_to_hf.py output).")
    transformers = importlib.import_module("transformers")
    auto = importlib.import_module("transformers.models.auto.modeling_auto")
    try:
        cfg = transformers.AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=True)
    except Exception as e:  # noqa: BLE001 - any failure to read the config is the user's source
        raise IOSourceError(f"{where}: transformers cannot read its config ({type(e).__name__}: {e}). Fix: point "
                            "source= at a causal LM directory.") from None
    archs = list(getattr(cfg, "architectures", None) or [])
    # an encoder family that can also be built as a decoder (BERT, RoBERTa, ...) is causal only
    # with is_decoder=True; otherwise the type must have a causal-LM class
    encoder_family = cfg.model_type in auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES
    causal = ((cfg.model_type in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
               and (not encoder_family or getattr(cfg, "is_decoder", False)))
              or "AutoModelForCausalLM" in (getattr(cfg, "auto_map", None) or {}))
    if not causal or getattr(cfg, "is_encoder_decoder", False):
        raise IOSourceError(f"{where}: {cfg.model_type!r} ({archs or 'no architectures'}) is not a causal LM "
                            "(AutoModelForCausalLM cannot load it causally; a bidirectional model would let token t "
                            "see later tokens). Fix: use a decoder-only causal LM.")
    layers = cfg.num_hidden_layers
    if not -layers - 1 <= layer <= layers:
        raise IOSourceError(f"{where}: layer={layer} is outside 0..{layers} (the model has {layers} layers; 0 = "
                            "embeddings, -1 = last). Fix: choose a layer in range.")
    return cfg


def _weight_files(path: str) -> list[str]:
    return sorted(f for f in os.listdir(path) if f.endswith(WEIGHT_SUFFIXES))


def model_identity(path: str) -> dict:
    """What a checkpoint records: the directory and sha256 over config.json and the weight files.
    Hashed once per process and state of the files (name, size, mtime): every save records it for
    every layer, and the weights may be gigabytes."""
    files = ["config.json", *_weight_files(path)]
    stats = tuple((n, st.st_size, st.st_mtime_ns) for n in files for st in [os.stat(os.path.join(path, n))])
    return dict(_hashed_identity(os.path.abspath(path), stats))


@functools.lru_cache(maxsize=16)
def _hashed_identity(path: str, stats: tuple) -> tuple:
    h = hashlib.sha256()
    for name, _, _ in stats:
        h.update(name.encode())
        with open(os.path.join(path, name), "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
    with open(os.path.join(path, "config.json")) as f:
        hidden = json.load(f).get("hidden_size")
    return tuple({"path": path, "sha256": h.hexdigest(), "hidden_size": hidden}.items())


# --- packing states into the int64 context ----------------------------------------------------


def packed_columns(hidden: int) -> int:
    """int64 columns that hold `hidden` float32 values bit-exactly."""
    return -(-hidden * PACK_DTYPE.itemsize // PACK_BYTES)


def pack_states(states: torch.Tensor) -> torch.Tensor:
    """[..., H] float -> [..., packed_columns(H)] int64: the states as float32, bit for bit."""
    h = states.shape[-1]
    states = torch.nn.functional.pad(states.to(PACK_DTYPE), (0, packed_columns(h) * 2 - h)).contiguous()
    return states.view(torch.int64)


def unpack_states(cols: torch.Tensor, hidden: int) -> torch.Tensor:
    """[T, packed columns] int64 -> [T, H] float32 (inverse of pack_states)."""
    return cols.contiguous().view(PACK_DTYPE)[..., :hidden]


# --- re-tokenization ---------------------------------------------------------------------------


class Retokenizer:
    """Neon ids -> frozen ids and, per Neon token, the index of the last frozen token that ends at
    or before it ends (-1: none). Both tokenizers are sentencepiece models."""

    def __init__(self, neon_model: str, frozen_model: str):
        spm = importlib.import_module("sentencepiece")
        models = []
        for path in (neon_model, frozen_model):
            try:
                models.append(spm.SentencePieceProcessor(model_file=path))
            except (OSError, RuntimeError) as e:
                raise IOSourceError(f"re-tokenization: {path!r} is not a sentencepiece model ({e}). Fix: give Neon's "
                                    "sentencepiece .model as tokenizer=, and the frozen model's as its "
                                    "tokenizer.model.") from None
        self.neon, self.frozen = models

    def _piece(self, i: int) -> str:
        sp = self.neon
        if i < 0 or i >= sp.get_piece_size() or sp.is_control(i) or sp.is_unknown(i):
            return ""
        return sp.id_to_piece(i)

    def align(self, ids: list[int]) -> tuple[list[int], list[int]]:
        """(frozen ids, source index per Neon token) for one sequence."""
        pieces = [self._piece(i) for i in ids]
        text = "".join(pieces)  # '▁' marks a space
        ends, n = [], 0
        for p in pieces:
            n += len(p)
            ends.append(n)
        frozen = self.frozen.encode(text.replace("\u2581", " "))
        fpieces = [self.frozen.id_to_piece(i) for i in frozen]
        ftext = "".join(fpieces)
        shift = len(ftext) - len(text)  # the frozen tokenizer's own leading '▁' (dummy prefix)
        if ftext[shift:] != text or shift < 0:
            raise IOSourceError(f"re-tokenization: the frozen tokenizer's pieces {ftext[:40]!r} do not spell the Neon "
                                f"text {text[:40]!r} (different normalization). Fix: use tokenizers with the same "
                                "normalization rules.")
        fends, m = [], -shift
        for p in fpieces:
            m += len(p)
            fends.append(m)
        src, j = [], -1
        for e in ends:
            while j + 1 < len(fends) and fends[j + 1] <= e:
                j += 1
            src.append(j)
        return frozen, src


def retokenizer(spec: IOSpec, settings: IOSettings) -> Optional[Retokenizer]:
    """None when the Neon ids can be fed as they are; checks the vocabularies at start."""
    cfg = frozen_config(spec)
    if not spec.options.tokenizer:
        if settings.vocab_size > cfg.vocab_size:
            raise IOSourceError(f"{spec.where()}: Neon's vocab_size {settings.vocab_size} exceeds the frozen model's "
                                f"{cfg.vocab_size}, so the vocabularies differ. Fix: set tokenizer=<Neon's "
                                "sentencepiece .model> (re-tokenization), with the frozen model's tokenizer.model in "
                                "its directory.")
        return None
    frozen_tok = os.path.join(spec.source, "tokenizer.model")
    for path, what in ((spec.options.tokenizer, "tokenizer="), (frozen_tok, "the frozen model's tokenizer.model")):
        if not os.path.isfile(path):
            raise IOSourceError(f"{spec.where()}: {what} {path!r} does not exist. Fix: give Neon's sentencepiece "
                                "model as tokenizer= and put the frozen model's sentencepiece model in its directory "
                                "as tokenizer.model.")
    with open(spec.options.tokenizer, "rb") as a, open(frozen_tok, "rb") as b:
        if a.read() == b.read():
            return None  # the same vocabulary: no re-tokenization
    return Retokenizer(spec.options.tokenizer, frozen_tok)


# --- the provider: one frozen model per source ----------------------------------------------------


class FrozenModels(ContextProvider):
    """The frozen model of one source, run once per forward pass for every function reading it:
    each function's layer, packed into its context columns."""

    def __init__(self, specs: list[IOSpec], settings: IOSettings):
        self.specs, self.settings = specs, settings
        self.source = specs[0].source
        self.cfg = frozen_config(specs[0])
        self.columns = {s.name: packed_columns(self.cfg.hidden_size) for s in specs}
        self.retokenizer = retokenizer(specs[0], settings)
        self.model = None  # loaded at the first forward (device and dtype of the model's run)
        self.seconds, self.calls = 0.0, 0  # time spent in `compute` (the log's frozen share)

    def load(self, device: torch.device, dtype: torch.dtype):
        if self.model is None:
            transformers = importlib.import_module("transformers")
            model = transformers.AutoModelForCausalLM.from_pretrained(
                self.source, local_files_only=True, trust_remote_code=True, dtype=dtype)
            self.model = model.to(device).eval().requires_grad_(False)
        return self.model

    def memory_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters()) if self.model is not None else 0

    @staticmethod
    def _per_document(model, input_ids, documents) -> list[torch.Tensor]:
        """The frozen model's hidden states [b, s, H] (one per layer) with each document of each row
        run on its own (right-padded into one batch): no state sees an earlier document."""
        b, s = input_ids.shape
        segments = []  # (row, start, end)
        for j in range(b):
            d = documents[j]
            cuts = [0, *(torch.nonzero(d[1:] != d[:-1]).flatten() + 1).tolist(), s]
            segments += [(j, a, e) for a, e in zip(cuts[:-1], cuts[1:])]
        width = max(e - a for _, a, e in segments)
        ids = input_ids.new_zeros(len(segments), width)
        mask = input_ids.new_zeros(len(segments), width)
        for i, (j, a, e) in enumerate(segments):
            ids[i, :e - a], mask[i, :e - a] = input_ids[j, a:e], 1
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
        states = []
        for h in out.hidden_states:
            full = h.new_zeros(b, s, h.shape[-1])
            for i, (j, a, e) in enumerate(segments):
                full[j, a:e] = h[i, :e - a]
            states.append(full)
        return states

    @torch.no_grad()
    def compute(self, input_ids, context, *, dtype, attention_mask=None, cache=None, documents=None):
        t0 = time.perf_counter()
        model = self.load(input_ids.device, dtype)
        b, s = input_ids.shape
        ids, src = input_ids, None
        if documents is not None and self.retokenizer is not None:
            raise IOSourceError(f"{self.specs[0].where()}: a re-tokenizing frozen model cannot honour document masks "
                                "(--reset-attention-mask). Fix: use a frozen model with the run's tokenizer, or "
                                "train without --reset-attention-mask.")
        if self.retokenizer is not None:
            if cache is not None:
                raise IOSourceError(f"{self.specs[0].where()}: re-tokenization needs the whole sequence at every "
                                    "forward. Fix: generate with use_cache=False.")
            rows = [self.retokenizer.align(r) for r in input_ids.tolist()]
            width = max(1, max(len(f) for f, _ in rows))
            ids = torch.zeros(b, width, dtype=torch.long)  # right padding: causal, never attended
            for j, (f, _) in enumerate(rows):
                ids[j, :len(f)] = torch.tensor(f, dtype=torch.long)
            ids = ids.to(input_ids.device)
            src = torch.tensor([r for _, r in rows], dtype=torch.long, device=input_ids.device)  # [b, s]
        kwargs = {"use_cache": cache is not None}
        if attention_mask is not None and src is None:
            kwargs["attention_mask"] = attention_mask
        if cache is not None:  # generation: the frozen model's own KV cache, kept with the model's
            # transformers 5 names the cache argument `cache`; older (remote) code `past_key_values`
            kwargs[_cache_argument(model)] = cache.providers.get(self.source)
        if documents is not None:
            hidden_states = self._per_document(model, ids, documents)
        else:
            out = model(input_ids=ids, output_hidden_states=True, **kwargs)
            if cache is not None:
                cache.providers[self.source] = getattr(out, "cache", None) or out.past_key_values
            hidden_states = out.hidden_states
        cols = {}
        for spec in self.specs:
            h = hidden_states[spec.options.layer]  # [b, s', H]
            if src is not None:
                picked = h.gather(1, src.clamp(min=0).unsqueeze(-1).expand(b, s, h.shape[-1]))
                h = picked * (src >= 0).unsqueeze(-1).to(h.dtype)  # zeros: no frozen token yet
            if h.shape[-1] != self.cfg.hidden_size:
                raise IOSourceError(f"{spec.where()}: layer {spec.options.layer} gives states of width {h.shape[-1]}, "
                                    f"its config says hidden_size={self.cfg.hidden_size}. Fix: use a model whose "
                                    "hidden states have the config's width.")
            cols[spec.name] = pack_states(h.to(dtype))
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return cols

    def report(self, step_time_s):
        """The frozen model's share of the step and its weights' memory (GB); restarts the count."""
        share = self.seconds / max(step_time_s, 1e-9)
        self.seconds = 0.0
        return {"frozen_model_time_share": share, "frozen_model_memory_gb": self.memory_bytes() / 1e9}


def _cache_argument(model) -> str:
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class ModelFunction(IOFunction):
    """f(x, c) = W_out h (h: its routed tokens' frozen states, unpacked from its context columns)."""

    def __init__(self, spec: IOSpec, settings: IOSettings):
        super().__init__(spec, settings)
        self.hidden = frozen_config(spec).hidden_size
        self.build_out(self.hidden)

    def read(self, x, context, extra):
        if extra is None:
            raise RuntimeError(f"{self.spec.where()}: no frozen states in the context: build it with the model's "
                               "context providers (FrozenModels)")
        return unpack_states(extra, self.hidden)

    def source_identity(self) -> dict:
        return {**super().source_identity(), "layer": self.spec.options.layer, **model_identity(self.spec.source)}

    def check_source(self, recorded: dict) -> None:
        now = self.source_identity()
        if self.settings.source_swap:
            if recorded.get("hidden_size") == now["hidden_size"]:
                return
            raise IOSourceError(
                f"{self.spec.where()}: the checkpoint was trained with the frozen model {recorded.get('path')!r} of "
                f"hidden size {recorded.get('hidden_size')}; this one, {now['path']!r}, has {now['hidden_size']}, so "
                "the learned projection W_out does not fit it, even as an asked-for swap. Fix: swap in a model of the "
                "checkpoint's hidden size, or train the function anew.")
        if recorded.get("sha256") != now["sha256"] or recorded.get("layer") != now["layer"]:
            raise IOSourceError(
                f"{self.spec.where()}: the checkpoint was trained with the frozen model {recorded.get('path')!r} "
                f"(layer {recorded.get('layer')}, sha256 {str(recorded.get('sha256'))[:12]}...), this one is "
                f"{now['path']!r} (layer {now['layer']}, sha256 {now['sha256'][:12]}...). Fix: configure the original "
                "model directory and layer, or ask for a swap to train on with this one, of the same hidden size "
                "(--flaming-io-store-swap; flaming_io_store_swap=True in a config).")


def _by_source(specs: list[IOSpec]) -> dict[str, list[IOSpec]]:
    groups: dict[str, list[IOSpec]] = {}
    for spec in specs:
        if spec.kind == ModelKind.name:
            groups.setdefault(spec.source, []).append(spec)
    return groups


class ModelKind(IOKind):
    name = "model"
    options = ModelOptions

    def check_source(self, spec, settings):
        frozen_config(spec)
        retokenizer(spec, settings)

    def build(self, spec, settings):
        return ModelFunction(spec, settings)

    def context_columns(self, specs, settings):
        return {s.name: packed_columns(frozen_config(s).hidden_size)
                for group in _by_source(specs).values() for s in group}

    def providers(self, specs, settings):
        return [FrozenModels(group, settings) for group in _by_source(specs).values()]

    def macs(self, spec, settings):
        """H_A * d: the learned projection of the frozen state (its forward: forward_only_macs)."""
        return frozen_config(spec).hidden_size * settings.hidden_size

    def forward_only_macs(self, specs, settings, seq_length, keys):
        """Per token, per distinct source: its linear layers' weights (every matmul but attention's;
        the LM head included, since the causal-LM forward computes logits at every position) + per
        layer 2 keys H_A d_A (Q K^T and A V over its own causal keys). With re-tokenization it is
        counted at Neon's tokens; a frozen MoE counts every expert."""
        total = 0.0
        for group in _by_source(specs).values():
            cfg = frozen_config(group[0])
            heads = cfg.num_attention_heads
            head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
            total += linear_macs(group[0].source) + cfg.num_hidden_layers * 2 * keys(
                getattr(cfg, "sliding_window", None)) * heads * head_dim
        return total


def linear_macs(source: str) -> int:
    """in x out summed over the frozen model's linear layers (GPT-2's Conv1D included), built on
    the meta device from its config: no weight is read or allocated."""
    path = os.path.join(source, "config.json")
    return _linear_macs(os.path.abspath(source), os.stat(path).st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _linear_macs(source: str, _mtime: int) -> int:
    transformers = importlib.import_module("transformers")
    cfg = transformers.AutoConfig.from_pretrained(source, local_files_only=True, trust_remote_code=True)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, trust_remote_code=True)
    total = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            total += m.in_features * m.out_features
        elif type(m).__name__ == "Conv1D":  # transformers' GPT-2 projection: weight [in, out]
            total += m.weight.numel()
    return total
