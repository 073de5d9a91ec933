"""FlamingMoE IO functions with nGPT: the IO outputs join the layer through nGPT's normalized
update (the block's r, IO terms included, goes through h <- Norm(h + |alpha_F| (Norm(r) - h)):
output and gradients against a plain-PyTorch reference of that equation in fp32), W_out columns
and W_q rows are kept on the unit sphere (a global-bank IO function's too), and a model with a
store and callables in both banks trains (finite losses that fall over a few steps on a
repeated batch)."""

import torch
from megatron.core import parallel_state
from megatron.core.optimizer import OptimizerConfig

from neon.config import NeonConfig
from neon.flaming.io import token_context
from neon.io.encoder import describe
from neon.io.store import write_store
from neon.model import build_model
from neon.ngpt import NORM_DIM_ATTR, scaling_constants
from neon.training.optim import build_optimizer
from neon.training.step import build_model_chunks, train_step
from tests.dist import run_distributed
from tests.neon import test_flaming_moe_io as io

VOCAB, SEQ, MB = 32, 8, 2


def train_ngpt_io(store: str) -> dict:
    cfg = NeonConfig(
        num_layers=2, hidden_size=16, num_attention_heads=2, ffn_hidden_size=24, vocab_size=VOCAB,
        max_position_embeddings=16, ngpt=True, flaming_moe="between", flaming_layer_functions=1,
        flaming_global_functions=1, flaming_router="topk", flaming_topk=2, flaming_io_context_window=4,
        pipeline_dtype=torch.float32,
        flaming_io_functions=[f"name=facts,kind=store,source={store},query=hidden,topk=2",
                              "name=add,kind=callable,source=tests.neon.io_callables:sum_last_two,width=2",
                              "name=g,kind=callable,source=tests.neon.io_callables:sum_last_two,width=2,bank=global"],
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size())
    chunks = build_model_chunks(cfg, build_model)
    model = chunks[0].module
    tagged = {n: getattr(p, NORM_DIM_ATTR) for n, p in model.named_parameters() if hasattr(p, NORM_DIM_ATTR)}
    opt = build_optimizer(chunks, OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.0, bf16=False))
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (MB, SEQ + 1), generator=gen)
    batch = dict(tokens=tokens[:, :-1], labels=tokens[:, 1:], position_ids=torch.arange(SEQ).expand(MB, SEQ),
                 loss_mask=torch.ones(MB, SEQ))
    losses = [train_step(chunks, opt, iter([batch]), cfg, num_microbatches=1, seq_length=SEQ,
                         micro_batch_size=MB).loss for _ in range(6)]
    norms = {n: p.detach().norm(dim=tagged[n]) for n, p in model.named_parameters() if n in tagged and "out_proj" in n}
    return dict(tagged={n: d for n, d in tagged.items() if "out_proj" in n or "query_proj" in n},
                losses=losses, out_norms=norms)


def test_io_with_ngpt_trains_on_the_sphere(tmp_path):
    store = str(tmp_path / "store")
    gen = torch.Generator().manual_seed(1)
    write_store(store, describe("random:3", 3, 8, VOCAB), [torch.randint(0, VOCAB, (20,), generator=gen).tolist()
                                                           for _ in range(3)])
    (r,) = run_distributed(train_ngpt_io, 1, kwargs={"store": store}, timeout=300)
    assert sorted(r["tagged"]) == sorted([  # the global bank's IO function once, on the model
        *(f"decoder.layers.{i}.flaming_moe.layer_bank.experts.local_experts.{j}.{p}"
          for i in (0, 1) for j, p in ((1, "out_proj.weight"), (1, "query_proj.weight"), (2, "out_proj.weight"))),
        "flaming_global_functions.local_experts.1.out_proj.weight"])
    assert all(d == (0 if "out_proj" in n else 1) for n, d in r["tagged"].items())
    for name, norms in r["out_norms"].items():  # unit columns after 6 optimizer steps (fp32 rounding)
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5), (name, norms)
    losses = r["losses"]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 0.05, losses


# --- parity: the IO bank's output through nGPT's normalized update, against the equations --------


def reference_ngpt_update(h, r, alpha):
    """h <- Norm(h + |alpha| (Norm(r) - h)), h [T, d] on the unit sphere, r the bank's output."""
    unit = torch.nn.functional.normalize
    return unit(h + alpha.abs() * (unit(r, dim=-1) - h), dim=-1)


def ngpt_bound(base: float, r: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor) -> float:
    """The bank's fp32 bound (tests/neon/test_flaming_moe_io.py: bound) carried through the update:
    |Norm(a + e) - Norm(a)| <= 2 |e|_2 / |a|_2 (and |e|_2 <= sqrt(d) max|e|), so each of the two
    normalizations (of r, and of v = h + |alpha| (Norm(r) - h)) multiplies an entry's error by at
    most 1 + 2 sqrt(d) / min_t |.|_2, the update by 1 + max|alpha|; the same Lipschitz factors
    bound the backward pass through them."""
    d = r.shape[-1]
    amp_r = 1 + 2 * d ** 0.5 / r.norm(dim=-1).min().item()
    amp_v = 1 + 2 * d ** 0.5 / v.norm(dim=-1).min().item()
    return base * amp_r * (1 + alpha.abs().max().item()) * amp_v


def check_ngpt_io_parity(store: str) -> dict:
    cfg = io.io_config(store, "alltoall", ngpt=True)
    layer = build_model(cfg).decoder.layers[0]
    bank = layer.flaming_moe.layer_bank
    gen = torch.Generator().manual_seed(7)
    w_router, params = torch.randn(io.N_FUNCS, io.D, generator=gen), io.make_params(gen)
    alpha = torch.randn(io.D, generator=gen) * 0.3  # effective alpha_F, both signs (|alpha| is used)
    h = torch.nn.functional.normalize(torch.randn(io.SEQ, io.BATCH, io.D, generator=gen), dim=-1)
    ids = torch.randint(0, io.V, (io.BATCH, io.SEQ), generator=gen)
    weights = torch.randn(io.SEQ, io.BATCH, io.D, generator=gen)
    init, scale = scaling_constants(cfg)["alpha"]
    with torch.no_grad():
        bank.router.weight.copy_(w_router)
        layer.flaming_bda.alpha.copy_(alpha * scale / init)  # stored at `scale`, used as stored * init / scale
        for g, expert in enumerate(bank.experts.local_experts):
            for name, t in params[g].items():
                io.module_param(expert, g, name).copy_(t)
    x = h.clone().requires_grad_(True)
    ctx = token_context(ids, io.W)
    out = layer._forward_flaming(x, ctx)  # no pre-norm under nGPT: the bank reads h itself
    (out * weights).sum().backward()

    ref_w, ref_a = w_router.clone().requires_grad_(True), alpha.clone().requires_grad_(True)
    ref_p = [{n: t.clone().requires_grad_(True) for n, t in f.items()} for f in params]
    keys, values = io.read_store(store)
    xr = h.clone().view(-1, io.D).requires_grad_(True)
    r = io.reference_bank(xr, ctx.view(-1, 2 + io.W), ref_w, ref_p, keys, values)
    ref = reference_ngpt_update(xr, r, ref_a)
    (ref.view_as(h) * weights).sum().backward()
    v = xr + ref_a.abs() * (torch.nn.functional.normalize(r, dim=-1) - xr)
    grads = {"h": (x.grad.view(-1, io.D), xr.grad), "router": (bank.router.weight.grad, ref_w.grad),
             # alpha's gradient in effective units: d/d(effective) = d/d(stored) * scale / init
             "alpha": (layer.flaming_bda.alpha.grad * scale / init, ref_a.grad)}
    for g, expert in enumerate(bank.experts.local_experts):
        for name in params[g]:
            grads[f"f{g}.{name}"] = (io.module_param(expert, g, name).grad, ref_p[g][name].grad)
    without_inner_norm = torch.nn.functional.normalize(xr + ref_a.abs() * (r - xr), dim=-1)
    return dict(out=(out.detach().view(-1, io.D), ref.detach()), grads=grads, r=r.detach(), v=v.detach(),
                alpha=alpha, wrong=without_inner_norm.detach())


def test_io_bank_with_ngpt_matches_the_normalized_update(tmp_path):
    """The IO bank [learned, store (hidden), store (context), callable] in an nGPT layer, fp32, EP=1:
    the layer's output and the gradients of h, the router, alpha_F and every learned part agree
    with the dense reference of tests/neon/test_flaming_moe_io.py pushed through
    h <- Norm(h + |alpha_F| (Norm(r) - h)), within the bank's bound carried through the update."""
    store = io.build_test_store(str(tmp_path / "store"))
    (res,) = run_distributed(check_ngpt_io_parity, 1, kwargs={"store": store}, timeout=300)
    got, ref = res["out"]
    tol = ngpt_bound(io.bound(ref), res["r"], res["v"], res["alpha"])
    assert tol < 1e-3, ("the bound is too loose to catch anything", tol)
    assert (got - ref).abs().max().item() <= tol
    # the check can fail: the update without the inner Norm(r) lies far outside the bound
    assert (res["wrong"] - ref).abs().max().item() > 10 * tol
    for key, (got, ref) in res["grads"].items():
        assert ref.abs().max() > 1e-3, (key, "reference gradient is degenerate")
        tol = ngpt_bound(io.bound(ref), res["r"], res["v"], res["alpha"])
        assert (got - ref).abs().max().item() <= tol, (key, (got - ref).abs().max().item(), tol)
