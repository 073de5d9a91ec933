"""`model`: a frozen causal LM (any local directory `transformers` loads) as a FlamingMoE IO function.

    "name=anchor,kind=model,source=/models/mistral_small,layer=-1"
    "name=anchor,kind=model,source=/models/other_vocab,layer=4,tokenizer=/data/neon_tok.model"

The composition of an anchor model with an augmenting one, as in CALM (Bansal et al., 2024),
routed per token:

    f(x_t, c_t) = W_out h^A_k(t)          h^A_k: the frozen model's hidden state at layer k
                                          (0 = embeddings, L = last layer; -1: the last)

How it runs (one frozen model per pipeline stage, shared by every layer and bank):
  - `FrozenModel` wraps the `transformers` model: loaded once per process by the IOGPTModel of
    the stage (AutoModelForCausalLM, local_files_only), in the training dtype, on the rank's
    device, eval mode, requires_grad False, and held outside the module tree (an attribute
    dict), so its weights are in no optimizer and no Neon checkpoint.
  - Once per micro-batch, in the model's forward (under no_grad), it runs on the micro-batch's
    input ids, causally (its own causal mask: state t sees tokens <= t). The states of the
    configured layer are packed bit-exactly into int64 columns appended to the token context
    (`pack_states`), so they travel with the context as a forward argument: through the
    dispatcher (only the routed tokens' rows move), through activation recompute and the
    pipeline schedule, never as state between micro-batches.
  - `ModelFunction.read` unpacks its columns for its routed tokens; W_out is learned.

Vocabularies. Without `tokenizer=`, the Neon ids are fed to the frozen model as they are (the
two models share a vocabulary; Neon's vocab_size must not exceed the frozen model's). With
`tokenizer=<Neon's sentencepiece model>` and a different vocabulary in `<source>/tokenizer.model`,
each sequence is re-tokenized (`Retokenizer`): the Neon pieces are joined into text, the frozen
tokenizer encodes it, and Neon token t gets the state of the last frozen token that ends at or
before t ends (zeros if none). The frozen tokenization is of the whole micro-batch sequence;
sentencepiece does not merge across whitespace, so a frozen token that ends at or before t ends
depends on the characters of t's word up to there and, inside a word, may depend on how the
word continues (the segmentation of a word is chosen for the whole word). That within-word
effect is the only way later text reaches token t.

Identity: a checkpoint records the directory and the sha256 of config.json and the weight files
(`model_identity`); loading with another model is an error (exit status 4 in pretrain_neon.py;
--flaming-io-store-swap accepts one of the same hidden size).

Under tensor parallelism every TP rank holds its own replica and runs it on the whole sequence
(neon/flaming/io_model.py hands each rank's layers the context rows of its part). Its FLOPs:
neon/flaming/flops.py `frozen_forward_macs`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from typing import Optional

import torch

from neon.flaming.io import CONTEXT_FIXED_COLUMNS, IOFunction, IOFunctionSpec, IOSourceError, io_specs

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
PACK_BYTES = 8  # int64 context columns


# --- the directory: config, causality, identity ----------------------------------------------


def frozen_config(spec: IOFunctionSpec):
    """The frozen model's `transformers` config, checked: a directory, a causal LM, a valid layer."""
    where, path = spec.where(), spec.source
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
        raise IOSourceError(f"{where}: {path!r} is not a directory with a config.json. Fix: point "
                            "source= at a local model directory (save_pretrained or "
                            "tools/convert_to_hf.py output).")
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    try:
        cfg = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=True)
    except Exception as e:  # noqa: BLE001 - any failure to read the config is the user's source
        raise IOSourceError(f"{where}: transformers cannot read its config ({type(e).__name__}: "
                            f"{e}). Fix: point source= at a causal LM directory.") from None
    archs = list(getattr(cfg, "architectures", None) or [])
    # an encoder family that can also be built as a decoder (BERT, RoBERTa, ...) is causal only
    # with is_decoder=True; otherwise the type must have a causal-LM class
    encoder_family = cfg.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    causal = ((cfg.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
               and (not encoder_family or getattr(cfg, "is_decoder", False)))
              or "AutoModelForCausalLM" in (getattr(cfg, "auto_map", None) or {}))
    if not causal or getattr(cfg, "is_encoder_decoder", False):
        raise IOSourceError(f"{where}: {cfg.model_type!r} ({archs or 'no architectures'}) is not a "
                            "causal LM (AutoModelForCausalLM cannot load it causally; a bidirectional "
                            "model would let token t see later tokens). Fix: use a decoder-only causal LM.")
    layers = cfg.num_hidden_layers
    if not -layers - 1 <= spec.layer <= layers:
        raise IOSourceError(f"{where}: layer={spec.layer} is outside 0..{layers} (the model has "
                            f"{layers} layers; 0 = embeddings, -1 = last). Fix: choose a layer in range.")
    return cfg


def _weight_files(path: str) -> list[str]:
    return sorted(f for f in os.listdir(path) if f.endswith(WEIGHT_SUFFIXES))


def model_identity(path: str) -> dict:
    """What a checkpoint records: the directory and sha256 over config.json and the weight files.
    Hashed once per process and state of the files (name, size, mtime): every save records it
    for every layer, and the weights may be gigabytes."""
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


def packed_columns(hidden: int, dtype: torch.dtype) -> int:
    """int64 columns that hold `hidden` values of `dtype` bit-exactly."""
    size = torch.empty((), dtype=dtype).element_size()
    return -(-hidden * size // PACK_BYTES)


def pack_states(states: torch.Tensor) -> torch.Tensor:
    """[..., H] float -> [..., packed_columns(H)] int64, the same bits."""
    h, size = states.shape[-1], states.element_size()
    pad = packed_columns(h, states.dtype) * PACK_BYTES // size - h
    states = torch.nn.functional.pad(states, (0, pad)).contiguous()
    return states.view(torch.int64)


def unpack_states(cols: torch.Tensor, hidden: int, dtype: torch.dtype) -> torch.Tensor:
    """[T, packed columns] int64 -> [T, H] of `dtype` (inverse of pack_states)."""
    return cols.contiguous().view(dtype)[..., :hidden]


def model_specs(config) -> list[IOFunctionSpec]:
    return [s for s in io_specs(config) if s.kind == "model"]


def context_layout(config) -> dict[str, tuple[int, int]]:
    """{function name: (first column, columns)} of the packed states after the ids window."""
    start, out = CONTEXT_FIXED_COLUMNS + config.flaming_io_context_window, {}
    for spec in model_specs(config):
        n = packed_columns(frozen_config(spec).hidden_size, config.params_dtype)
        out[spec.name] = (start, n)
        start += n
    return out


# --- re-tokenization ---------------------------------------------------------------------------


class Retokenizer:
    """Neon ids -> frozen ids and, per Neon token, the index of the last frozen token that ends at
    or before it ends (-1: none). Both tokenizers are sentencepiece models."""

    def __init__(self, neon_model: str, frozen_model: str):
        import sentencepiece as spm

        self.neon = spm.SentencePieceProcessor(model_file=neon_model)
        self.frozen = spm.SentencePieceProcessor(model_file=frozen_model)

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
            raise IOSourceError(f"re-tokenization: the frozen tokenizer's pieces {ftext[:40]!r} do not "
                                f"spell the Neon text {text[:40]!r} (different normalization). Fix: "
                                "use tokenizers with the same normalization rules.")
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


# --- the frozen model --------------------------------------------------------------------------


class FrozenModel:
    """One frozen causal LM on this rank: states(input_ids [b, s]) -> {layer: [b, s, H]}."""

    def __init__(self, spec: IOFunctionSpec, config, device: Optional[torch.device] = None):
        from transformers import AutoModelForCausalLM

        self.spec, self.cfg = spec, frozen_config(spec)
        self.dtype = config.params_dtype
        self.device = device or (torch.device("cuda", torch.cuda.current_device())
                                 if torch.cuda.is_available() else torch.device("cpu"))
        self.model = AutoModelForCausalLM.from_pretrained(
            spec.source, local_files_only=True, trust_remote_code=True, dtype=self.dtype)
        self.model.to(self.device).eval().requires_grad_(False)
        self.retokenizer = retokenizer(spec, config)
        self.seconds, self.calls = 0.0, 0  # time spent in `states` (the log's frozen share)

    def memory_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    @torch.no_grad()
    def states(self, input_ids: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
        """input_ids [b, s] (Neon ids) -> {layer: [b, s, H]} in the training dtype."""
        t0 = time.perf_counter()
        b, s = input_ids.shape
        if self.retokenizer is None:
            ids, src = input_ids.to(self.device), None
        else:
            rows = [self.retokenizer.align(r) for r in input_ids.tolist()]
            width = max(1, max(len(f) for f, _ in rows))
            ids = torch.zeros(b, width, dtype=torch.long)  # right padding: causal, never attended
            for j, (f, _) in enumerate(rows):
                ids[j, :len(f)] = torch.tensor(f, dtype=torch.long)
            ids = ids.to(self.device)
            src = torch.tensor([r for _, r in rows], dtype=torch.long, device=self.device)  # [b, s]
        hidden = self.model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
        out = {}
        for k in layers:
            h = hidden[k].to(self.dtype)  # [b, s', H]
            if src is not None:
                picked = h.gather(1, src.clamp(min=0).unsqueeze(-1).expand(b, s, h.shape[-1]))
                h = picked * (src >= 0).unsqueeze(-1).to(h.dtype)  # zeros: no frozen token yet
            if h.shape[-1] != self.cfg.hidden_size:
                raise IOSourceError(f"{self.spec.where()}: layer {k} gives states of width "
                                    f"{h.shape[-1]}, its config says hidden_size={self.cfg.hidden_size}. "
                                    "Fix: use a model whose hidden states have the config's width.")
            out[k] = h
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out


def retokenizer(spec: IOFunctionSpec, config) -> Optional[Retokenizer]:
    """None when the Neon ids can be fed as they are; checks the vocabularies at start."""
    cfg = frozen_config(spec)
    if not spec.tokenizer:
        if config.vocab_size > cfg.vocab_size:
            raise IOSourceError(f"{spec.where()}: Neon's vocab_size {config.vocab_size} exceeds the "
                                f"frozen model's {cfg.vocab_size}, so the vocabularies differ. Fix: set "
                                "tokenizer=<Neon's sentencepiece .model> (re-tokenization), with the "
                                "frozen model's tokenizer.model in its directory.")
        return None
    frozen_tok = os.path.join(spec.source, "tokenizer.model")
    for path, what in ((spec.tokenizer, "tokenizer="), (frozen_tok, "the frozen model's tokenizer.model")):
        if not os.path.isfile(path):
            raise IOSourceError(f"{spec.where()}: {what} {path!r} does not exist. Fix: give Neon's "
                                "sentencepiece model as tokenizer= and put the frozen model's "
                                "sentencepiece model in its directory as tokenizer.model.")
    with open(spec.tokenizer, "rb") as a, open(frozen_tok, "rb") as b:
        if a.read() == b.read():
            return None  # the same vocabulary: no re-tokenization
    return Retokenizer(spec.tokenizer, frozen_tok)


# --- per stage: run once per micro-batch, append the packed states to the context -------------


def build_frozen_models(config) -> dict[str, FrozenModel]:
    """{source directory: FrozenModel}: one per distinct source (shared by its functions)."""
    out = {}
    for spec in model_specs(config):
        if spec.source not in out:
            out[spec.source] = FrozenModel(spec, config)
    return out


def append_frozen_states(context: torch.Tensor, input_ids: torch.Tensor, config,
                         frozen: dict[str, FrozenModel]) -> torch.Tensor:
    """context [s, b, 2 + W] -> [s, b, 2 + W + packed states of each model function]: each frozen
    model runs once (all the layers its functions read), under no_grad."""
    specs = model_specs(config)
    if not specs:
        return context
    layers: dict[str, list[int]] = {}
    for spec in specs:
        layers.setdefault(spec.source, []).append(spec.layer)
    states = {src: frozen[src].states(input_ids, sorted(set(ks))) for src, ks in layers.items()}
    cols = [pack_states(states[s.source][s.layer].transpose(0, 1).to(context.device)) for s in specs]
    return torch.cat([context, *cols], dim=-1)


class ModelFunction(IOFunction):
    """f(x, c) = W_out h (h: its routed tokens' frozen states, unpacked from the context)."""

    def __init__(self, config, spec: IOFunctionSpec):
        super().__init__(config, spec)
        self.hidden = frozen_config(spec).hidden_size
        self.columns = context_layout(config)[spec.name]
        self.build_out(self.hidden)

    def own_context(self, context):
        return context  # the token context and the packed states after it

    def read(self, hidden_states, context):
        start, n = self.columns
        if context.shape[1] < start + n:
            raise RuntimeError(f"{self.spec.where()}: the context has {context.shape[1]} columns, no "
                               "frozen states: build it with neon.flaming.frozen_model.append_frozen_states "
                               "(IOGPTModel does)")
        return unpack_states(context[:, start:start + n], self.hidden, self.config.params_dtype)

    def source_identity(self) -> dict:
        return {**super().source_identity(), "layer": self.spec.layer, **model_identity(self.spec.source)}

    def check_source(self, recorded: dict) -> None:
        now = self.source_identity()
        if self.config.flaming_io_store_swap:
            if recorded.get("hidden_size") == now["hidden_size"]:
                return
            raise IOSourceError(
                f"{self.spec.where()}: the checkpoint was trained with the frozen model "
                f"{recorded.get('path')!r} of hidden size {recorded.get('hidden_size')}; this one, "
                f"{now['path']!r}, has {now['hidden_size']}, so the learned projection W_out does not "
                "fit it, even as an asked-for swap. Fix: swap in a model of the checkpoint's hidden "
                "size, or train the function anew.")
        if recorded.get("sha256") != now["sha256"] or recorded.get("layer") != now["layer"]:
            raise IOSourceError(
                f"{self.spec.where()}: the checkpoint was trained with the frozen model "
                f"{recorded.get('path')!r} (layer {recorded.get('layer')}, sha256 "
                f"{str(recorded.get('sha256'))[:12]}...), this one is {now['path']!r} (layer "
                f"{now['layer']}, sha256 {now['sha256'][:12]}...). Fix: configure the original model "
                "directory and layer, or ask for a swap to train on with this one, of the same hidden "
                "size (--flaming-io-store-swap; flaming_io_store_swap=True in a config).")


def frozen_model_report(chunks, step_time_s: float) -> dict:
    """This rank's frozen models in the last step, for the training log: their share of the step
    time and their weights' memory (GB); restarts the time count. Empty without `model` functions."""
    models = {id(f): f for c in chunks for m in c.modules()
              for f in (getattr(m, "frozen_models", None) or {}).values()}.values()
    if not models:
        return {}
    seconds = sum(f.seconds for f in models)
    for f in models:
        f.seconds = 0.0
    return {"frozen_model_time_share": seconds / max(step_time_s, 1e-9),
            "frozen_model_memory_gb": sum(f.memory_bytes() for f in models) / 1e9}
