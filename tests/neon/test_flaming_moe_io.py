"""FlamingMoE IO functions (neon/io/: store, callable; neon/flaming/io_bank.py) in a bank with a learned
function, against a dense plain-PyTorch reference: every function on every token, weighted by
the same routing; the store read by brute force over the whole key file (read with numpy, not
the memmap code), the `context` query from an independent implementation of the documented
encoder. Outputs and the gradients of the learned parts (router, learned function, query and
output projections, value and callable embeddings) agree in fp32 at EP=1 and EP=2, with the
alltoall and the allgather dispatcher, in real gloo processes, for the bank in each place: the
per-layer bank, and the global bank (the model-level module run through the layer's
SharedFunctions, its `context` query's search done once for all tokens and carried in the
context: neon/io/store.py's ContextSearch). The callable sees only context rows made of its token
and earlier tokens of the same sequence."""

import os

import numpy as np
import pytest
import torch
from megatron.core import parallel_state

from neon.config import NeonConfig
from neon.flaming.block import FlamingMoE, build_global_bank
from neon.flaming.io import model_context, token_context
from neon.io.encoder import describe
from neon.io.store import write_store
from tests.dist import run_distributed
from tests.neon import io_callables

D, SEQ, BATCH, V, W = 16, 6, 2, 32, 4
KEY_DIM, NGRAM, WIDTH, TOPK = 8, 3, 2, 3
EPS32 = torch.finfo(torch.float32).eps
# f_0 learned linear | store, hidden query | store, context query | callable (token ids)
N_FUNCS = 4


def build_test_store(path: str) -> str:
    gen = torch.Generator().manual_seed(11)
    docs = [torch.randperm(V, generator=gen)[:20].tolist() for _ in range(2)]
    meta = write_store(path, describe("random:9", NGRAM, KEY_DIM, V), docs, value_width=WIDTH)
    keys = np.fromfile(os.path.join(path, "keys.f32"), dtype=np.float32).reshape(meta["entries"], KEY_DIM)
    assert len(np.unique(keys.round(5), axis=0)) == len(keys), "test store has duplicate keys"
    return path


def io_config(store: str, dispatcher: str, bank: str = "layer", **extra) -> NeonConfig:
    """The bank [learned, store (hidden), store (context), callable] as the per-layer or the global bank."""
    where = f",bank={bank}"
    io = [f"name=facts_h,kind=store,source={store},query=hidden,topk={TOPK},temperature=0.5,embed_dim=6{where}",
          f"name=facts_c,kind=store,source={store},query=context,topk={TOPK},embed_dim=6{where}",
          f"name=add,kind=callable,source=tests.neon.io_callables:recording_sum,width={WIDTH},embed_dim=5{where}"]
    learned = dict(flaming_global_functions=1, flaming_layer_functions=0) if bank == "global" else \
        dict(flaming_global_functions=0, flaming_layer_functions=1)
    return NeonConfig(num_layers=2, hidden_size=D, num_attention_heads=2, ffn_hidden_size=24, vocab_size=V,
                      max_position_embeddings=16, flaming_moe="between", **learned,
                      flaming_io_functions=io, flaming_io_context_window=W, flaming_router="topk",
                      flaming_topk=2, flaming_token_dispatcher=dispatcher,
                      expert_model_parallel_size=parallel_state.get_expert_model_parallel_world_size(),
                      pipeline_dtype=torch.float32, **extra)


def io_block(cfg: NeonConfig, bank: str):
    """(block, its bank with the IO functions, the module holding this rank's functions)."""
    block = FlamingMoE(cfg, layer_number=1)
    if bank == "layer":
        return block, block.layer_bank, block.layer_bank.experts
    functions = build_global_bank(cfg)  # what attach_global_bank gives the model
    block.global_bank.experts.attach(functions)
    return block, block.global_bank, functions


def block_context(cfg: NeonConfig, ids: torch.Tensor) -> torch.Tensor:
    """The context IOGPTModel builds: with the global bank, the reused search's columns after it."""
    return model_context(cfg, ids)


# --- the plain-PyTorch reference ---------------------------------------------------------------


def reference_encoder(ids: torch.Tensor) -> torch.Tensor:
    """The documented encoder, written again: normalize(sum_j s_j * E[id_j]) over the last n ids."""
    table = torch.randn(V, KEY_DIM, generator=torch.Generator().manual_seed(9)) / KEY_DIM ** 0.5
    signs = torch.randint(0, 2, (NGRAM, KEY_DIM), generator=torch.Generator().manual_seed(10)).float() * 2 - 1
    ids = ids[:, -NGRAM:]
    key = sum(torch.where((ids[:, j] >= 0).unsqueeze(-1), table[ids[:, j].clamp(min=0)] * signs[j], 0.0)
              for j in range(NGRAM))
    return torch.nn.functional.normalize(key, dim=-1)


def embed(table, ids):  # ids [..., m] (-1: none) -> [..., m * e]
    return (table[ids.clamp(min=0)] * (ids >= 0).unsqueeze(-1)).flatten(-2)


def reference_store(p, q, keys, values, temperature):
    scores = q @ keys.T  # [T, N], every key
    top = torch.topk(scores, TOPK, dim=1)
    w = torch.softmax(top.values / temperature, dim=1)  # [T, k]
    vals = embed(p["emb"], values[top.indices])  # [T, k, M * e]
    return ((w.unsqueeze(-1) * vals).sum(1)) @ p["out"].T


def reference_functions(params, x, ctx, keys, values):
    """All N_FUNCS functions on all tokens: [T, n, d]."""
    ids = ctx[:, 2:]
    return torch.stack([
        x @ params[0]["w"].T,
        reference_store(params[1], x @ params[1]["q"].T, keys, values, 0.5),
        reference_store(params[2], reference_encoder(ids), keys, values, 1.0),
        embed(params[3]["emb"], io_callables.sum_last_two(ctx)) @ params[3]["out"].T,
    ], dim=1)


def reference_bank(x, ctx, w_router, params, keys, values):
    p = torch.softmax(x @ w_router.T, dim=-1)
    top = torch.topk(p, 2, dim=-1).indices
    weights = torch.zeros_like(p).scatter(1, top, p.gather(1, top))
    return x + (weights.unsqueeze(-1) * reference_functions(params, x, ctx, keys, values)).sum(1)


def make_params(gen):
    def rnd(*shape):
        return torch.randn(*shape, generator=gen) * 0.3

    return [{"w": rnd(D, D)},
            {"q": rnd(KEY_DIM, D), "emb": rnd(V, 6), "out": rnd(D, WIDTH * 6)},
            {"emb": rnd(V, 6), "out": rnd(D, WIDTH * 6)},
            {"emb": rnd(V, 5), "out": rnd(D, WIDTH * 5)}]


NAMES = {"w": "linear.weight", "q": "query_proj.weight", "out": "out_proj.weight"}


def module_param(expert, g: int, name: str):
    if name == "emb":
        return (expert.embedding if g == 3 else expert.value_embedding).weight
    return expert.get_parameter(NAMES[name])


def read_store(store: str):
    """The store's raw files with numpy (not the memmap code): keys [N, K], values [N, M] int64."""
    meta_n = os.path.getsize(os.path.join(store, "keys.f32")) // (4 * KEY_DIM)
    keys = torch.from_numpy(np.fromfile(os.path.join(store, "keys.f32"), np.float32).reshape(meta_n, KEY_DIM))
    values = torch.from_numpy(np.fromfile(os.path.join(store, "values.bin"), np.int32).reshape(meta_n, WIDTH)).long()
    return keys, values


# --- the check in each process ---------------------------------------------------------------


def _case(store: str, dispatcher: str, bank: str) -> dict:
    ep = parallel_state.get_expert_model_parallel_world_size()
    rank = parallel_state.get_expert_model_parallel_rank()
    keys, values = read_store(store)
    gen = torch.Generator().manual_seed(5)
    w_router, params = torch.randn(N_FUNCS, D, generator=gen), make_params(gen)
    xs = [torch.randn(SEQ, BATCH, D, generator=gen) for _ in range(ep)]
    ids = [torch.randint(0, V, (BATCH, SEQ), generator=gen) for _ in range(ep)]
    rs = [torch.randn(SEQ, BATCH, D, generator=gen) for _ in range(ep)]

    cfg = io_config(store, dispatcher, bank)
    block, bank, functions = io_block(cfg, bank)
    local, first = functions.local_experts, functions.first_function
    with torch.no_grad():
        bank.router.weight.copy_(w_router)
        for i, expert in enumerate(local):
            for name, t in params[first + i].items():
                module_param(expert, first + i, name).copy_(t)
    io_callables.RECORDED.clear()
    x = xs[rank].clone().requires_grad_(True)
    out, _ = block(x, context=block_context(cfg, ids[rank]))
    (out * rs[rank]).sum().backward()

    ref_w = w_router.clone().requires_grad_(True)
    ref_p = [{n: t.clone().requires_grad_(True) for n, t in f.items()} for f in params]
    for r in range(ep):
        xr = xs[r].clone().requires_grad_(True)
        ctx = token_context(ids[r], W).view(-1, 2 + W)
        o = reference_bank(xr.view(-1, D), ctx, ref_w if r == rank else ref_w.detach(), ref_p,
                           keys, values).view_as(xr)
        (o * rs[r]).sum().backward()
        if r == rank:
            ref_out, ref_dx = o.detach(), xr.grad

    grads = {"router": (bank.router.weight.grad, ref_w.grad)}
    for i, expert in enumerate(local):
        for name in params[first + i]:
            grads[f"f{first + i}.{name}"] = (module_param(expert, first + i, name).grad,
                                            ref_p[first + i][name].grad)
    # causality: every context row the callable saw is (pos, seq, ids[seq, pos-W+1 .. pos]) of
    # some rank's micro-batch: its own token and earlier ones of its sequence only
    rows = torch.cat(io_callables.RECORDED) if io_callables.RECORDED else torch.zeros(0, 2 + W, dtype=torch.long)
    expected = torch.cat([token_context(i, W).view(-1, 2 + W) for i in ids])
    causal = all(bool((expected == row).all(1).any()) for row in rows)
    return dict(out=(out.detach(), ref_out), dx=(x.grad, ref_dx),
                grads={k: (a if a is not None else torch.zeros_like(b), b) for k, (a, b) in grads.items()},
                causal=causal, seen=len(rows), usage=bank.usage.tolist(),
                own_searches={e.spec.name: e.searched_rows for e in local if hasattr(e, "searched_rows")})


def check_io_parity(store: str):
    return {(bank, d): _case(store, d, bank) for bank in ("layer", "global") for d in ("alltoall", "allgather")}


def bound(ref: torch.Tensor) -> float:
    """fp32: the block and the reference order their sums differently (matmul blocking,
    scatter-add over the k choices, the top-k softmax); each of the <= 32 rounding steps on the
    path to an entry (d=16 inner products, k=3 store entries, 2 chosen functions) errs by at most
    eps times the entry's magnitude, which the reference's largest entry bounds."""
    return 32 * EPS32 * max(1.0, ref.abs().max().item())


@pytest.mark.slow
@pytest.mark.parametrize("ep", [1, 2], ids=["ep1", "ep2"])
def test_io_block_matches_dense_reference(ep, tmp_path):
    store = build_test_store(str(tmp_path / "store"))
    per_rank = run_distributed(check_io_parity, ep, ep=ep, kwargs={"store": store}, timeout=300)
    seen = 0
    for results in per_rank:
        for case, r in results.items():
            for key in ("out", "dx"):
                got, ref = r[key]
                assert (got - ref).abs().max().item() <= bound(ref), (case, key)
            for key, (got, ref) in r["grads"].items():
                assert ref.abs().max() > 1e-3, (case, key, "reference gradient is degenerate")
                assert (got - ref).abs().max().item() <= bound(ref), (case, key)
            assert r["causal"], (case, "the callable saw a context row with later tokens")
            assert min(r["usage"]) >= 2, (case, "routing left a function unused", r["usage"])
            if "facts_c" in r["own_searches"]:  # the global bank reads the model's one search
                assert (r["own_searches"]["facts_c"] == 0) == (case[0] == "global"), (case, r)
            if "facts_h" in r["own_searches"]:  # a `hidden` query searches in every layer
                assert r["own_searches"]["facts_h"] > 0, (case, r)
            seen += r["seen"]
    assert seen > 0
