"""FlamingMoE IO functions in a whole model, trained with megatron's schedules: the token
context is a forward argument, so full activation recompute (each layer's forward run again in
the backward pass) and the 1F1B pipeline schedule at PP=2 (micro-batch 1's backward after
micro-batch 2's forward) give the losses and gradient norms of the plain PP=1 run. A context
kept as state would feed a recomputed layer the wrong micro-batch's ids and change them.

The model has IO functions in both banks: a store and a callable in the per-layer bank, and a
`context`-query store in the global bank (one module per stage, shared by the layers), whose
search is done once per micro-batch and carried in the context (neon/io/store.py, ContextSearch).
Searching in every layer instead (`flaming_io_reuse_search=False`) gives the same losses bit
for bit, with more store rows scanned; `swap_store` attaches another store to the shared
function and to the stage's search alike. In the 'mlp' placement (the block in the MLP's place,
Neon's layer handing it the context) full recompute gives the losses of the plain run too."""

import re
import zlib

import pytest
import torch
from megatron.core import parallel_state

from neon.config import NeonConfig
from neon.io.encoder import describe
from neon.io.store import ContextSearch, swap_store, write_store
from neon.model import build_model
from neon.training.step import build_model_chunks
from tests.dist import run_distributed
from tests.train_helpers import random_batches, sgd_losses

VOCAB, SEQ, MB, STEPS, MICROBATCHES = 32, 8, 2, 3, 2
EPS32 = torch.finfo(torch.float32).eps


def io_model_config(store: str, recompute: bool, reuse: bool = True, placement: str = "between") -> NeonConfig:
    extra = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1) if recompute else {}
    return NeonConfig(
        num_layers=2, hidden_size=16, num_attention_heads=2, ffn_hidden_size=24, vocab_size=VOCAB,
        max_position_embeddings=16, flaming_moe=placement, flaming_layer_functions=1, flaming_router="topk",
        flaming_global_functions=2, flaming_topk=2, flaming_io_context_window=4, flaming_io_reuse_search=reuse,
        flaming_io_functions=[f"name=facts,kind=store,source={store},query=context,topk=2",
                              "name=add,kind=callable,source=tests.neon.io_callables:sum_last_two,width=2",
                              f"name=shared,kind=store,source={store},query=context,topk=2,bank=global"],
        pipeline_dtype=torch.float32,
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(), **extra)


def batches(n: int, seed: int = 0):
    return random_batches(n, vocab=VOCAB, micro_batch=MB, seq=SEQ, seed=seed)


def deterministic_init(model) -> None:
    """Each parameter from a seed of its global name (layer numbers counted over all stages), so
    every layout and run starts from the same weights."""
    offset = model.decoder.layers[0].layer_number - 1
    for name, p in model.named_parameters():
        name = re.sub(r"decoder\.layers\.(\d+)", lambda m: f"decoder.layers.{offset + int(m[1])}", name)
        gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        with torch.no_grad():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def train_io(store: str, recompute: bool, reuse: bool = True, placement: str = "between") -> dict:
    cfg = io_model_config(store, recompute, reuse, placement)
    chunks = build_model_chunks(cfg, build_model)
    deterministic_init(chunks[0].module)
    losses, norms = sgd_losses(chunks, cfg, batches(STEPS * MICROBATCHES), steps=STEPS, num_microbatches=MICROBATCHES,
                               seq_length=SEQ, micro_batch_size=MB)
    model = chunks[0].module
    usage = [b.usage.tolist() for m in model.modules() if hasattr(m, "layer_bank") for b in m.banks()]
    scanned = sum(getattr(f, "searched_rows", 0) for f in model.flaming_global_functions.local_experts)
    searches = [p for p in model.io_providers if isinstance(p, ContextSearch)]
    scanned += sum(s.rows for s in searches)
    # another store attached after training reaches the shared function and the stage's search
    old = model.flaming_global_functions.local_experts[2].store
    swapped = swap_store(model, "shared", store)
    users = [model.flaming_global_functions.local_experts[2].store, *(s.store for s in searches)]
    last = parallel_state.is_pipeline_last_stage()
    return dict(losses=losses if last else None, norms=norms, usage=usage, scanned=scanned,
                swapped=(swapped, len(users), all(u is users[0] and u is not old for u in users)))


def check_io_training(store: str):
    runs = {recompute: train_io(store, recompute) for recompute in (False, True)}
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        runs["no reuse"] = train_io(store, False, reuse=False)
        runs["mlp"] = train_io(store, False, placement="mlp")
        runs["mlp recompute"] = train_io(store, True, placement="mlp")
    return runs


@pytest.mark.slow
def test_io_context_survives_recompute_and_pipeline(tmp_path):
    store = str(tmp_path / "store")
    gen = torch.Generator().manual_seed(1)
    write_store(store, describe("random:3", 3, 8, VOCAB),
                [torch.randint(0, VOCAB, (40,), generator=gen).tolist()], value_width=1)
    (pp1,) = run_distributed(check_io_training, 1, kwargs={"store": store}, timeout=300)
    pp2 = run_distributed(check_io_training, 2, pp=2, kwargs={"store": store}, timeout=300)
    ref = pp1[False]
    assert all(u[-1] > 0 for u in ref["usage"]), ("IO functions never routed", ref["usage"])
    assert all(u[-2] > 0 for u in ref["usage"][1::2]), ("layer-bank store never routed", ref["usage"])
    # reuse: the same losses bit for bit; one search per token and micro-batch (not redone under
    # recompute) instead of one per token each layer routes to the shared store
    tokens = STEPS * MICROBATCHES * MB * SEQ
    no_reuse = pp1["no reuse"]
    assert no_reuse["losses"] == ref["losses"], (no_reuse["losses"], ref["losses"])
    assert ref["scanned"] == pp1[True]["scanned"] == tokens, (ref["scanned"], pp1[True]["scanned"])
    assert no_reuse["scanned"] == sum(u[-1] for u in no_reuse["usage"][0::2]) > tokens, no_reuse
    assert ref["losses"][-1] < ref["losses"][0], "training did not lower the loss"
    # fp32: the runs differ only in the order of sums (recompute: none; PP: the grad-norm
    # reduction over stages), a few eps of the O(1) loss after STEPS linear SGD updates
    tol = 64 * EPS32 * max(ref["losses"])
    for name, run, base in (("pp1 recompute", pp1[True], ref), ("pp2", pp2[1][False], ref),
                            ("pp2 recompute", pp2[1][True], ref), ("mlp recompute", pp1["mlp recompute"], pp1["mlp"])):
        assert max(abs(a - b) for a, b in zip(run["losses"], base["losses"])) <= tol, (name, run["losses"])
        assert max(abs(a - b) / b for a, b in zip(run["norms"], base["norms"])) <= 64 * EPS32, (name, run["norms"])
    assert ref["swapped"] == (2, 2, True) and no_reuse["swapped"] == (1, 1, True), (ref["swapped"], no_reuse["swapped"])
    mlp = pp1["mlp"]
    assert all(u[-1] > 0 for u in mlp["usage"]), ("IO functions never routed in the MLP's place", mlp["usage"])
    assert mlp["losses"][-1] < mlp["losses"][0] and mlp["losses"] != ref["losses"], mlp["losses"]
