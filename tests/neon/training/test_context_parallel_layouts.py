"""Context-parallel training gives the CP=1 losses and gradients, for every Neon attention.

Three SGD steps of megatron DDP on real gloo processes, at CP=2 against one process (every
parameter's reduced gradient after the first step, every step's loss and gradient norm), and at
CP=2 x TP=2 and PP=2 x CP=2 against the same TP or PP layout at CP=1 (losses, gradient norms).
Sequences of 16 tokens give CP=2 chunks of 4: a window of 3 needs the last 2 keys of the chunk
before (sent by a neighbour rank), one of 5 the whole chunk before and one of 7 reaches over it
(whole chunks gathered), and FlamingMoE's IO context window of 6 ids reaches into the chunk
another rank holds (store `context` queries and a callable read it; a frozen model's states need
the whole sequence before each token).

Bound. Every layout starts from the same weights and differs from CP=1 only in the order of fp32
sums: the attention of a chunk sums over its keys in another blocking, the token-mean loss is
summed per rank and then over the group, and each weight gradient is a sum over the ranks' tokens
in DDP's all-reduce. As in test_training_layouts (same tiny model: R = 26 reductions of at most
n = 128 terms), the random-walk estimate R sqrt(n) 2^-24 = 1.8e-5 bounds the loss (2e-5 relative)
and the gradients (4e-5 relative for the norm; per tensor, 4e-5 of the tensor's largest entry).
SGD's update is linear in the gradient, so the later steps keep the bounds. A chunk order, mask or
gather mistake moves losses by more than 1e-3.
"""

import pytest
import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallelConfig

from neon.config import NeonConfig
from neon.model import build_model
from neon.training.step import build_model_chunks
from tests.dist import run_distributed
from tests.train_helpers import random_batches, sgd_losses

SEQ, MB, MICRO, STEPS = 16, 2, 2, 3
LOSS_RTOL, GRAD_RTOL = 2e-5, 4e-5  # see the module docstring
TINY = dict(num_layers=2, hidden_size=32, num_attention_heads=8, num_query_groups=4, ffn_hidden_size=48,
            vocab_size=32, max_position_embeddings=32, rope_theta=10000.0, init_method_std=0.05)
DOCUMENTS = torch.tensor([0] * 3 + [1] * 8 + [2] * 5)  # boundaries inside chunks 0 and 2

VARIANTS = {
    "mistral": {},
    "window-in-chunk": dict(sliding_window=3),
    "window-over-chunks": dict(sliding_window=7),
    "diff-matched-window": dict(diff_attention="matched", sliding_window=5),
    "diff-expressive": dict(diff_attention="expressive"),
    "diff-v2-window": dict(diff_attention="v2", sliding_window=7),
    "ngpt": dict(ngpt=True),
    "ngpt-diff-window": dict(ngpt=True, diff_attention="matched", sliding_window=3),
    "documents": dict(sliding_window=7, documents=True),
    "loss-mask": dict(masked=True),  # CP ranks with different numbers of loss tokens
    "flaming": dict(flaming_moe="between", flaming_global_functions=2, flaming_layer_functions=2,
                    flaming_router="topk", flaming_topk=1, flaming_aux_loss_coeff=1e-2, flaming_z_loss_coeff=1e-3),
}
# --calculate-per-token-loss: megatron sums the gradients and the loss tokens over DP x CP
VARIANTS |= {"per-token-loss": dict(calculate_per_token_loss=True, masked=True),
             "flaming-per-token-loss": dict(VARIANTS["flaming"], calculate_per_token_loss=True, masked=True)}


def flaming_io(store: str, frozen: str) -> dict:
    """A per-layer bank of a learned function, a store read by a `context` query and a callable,
    each reading an ids window of 6 (wider than a chunk), and a frozen model (its states need every
    earlier token of the sequence); and a global bank."""
    io = [f"name=facts,kind=store,source={store},query=context,topk=2,embed_dim=6",
          "name=sums,kind=callable,source=tests.neon.io_callables:window_sum,width=1,embed_dim=5",
          f"name=anchor,kind=model,source={frozen},layer=1"]
    return dict(flaming_moe="between", flaming_global_functions=2, flaming_layer_functions=1,
                flaming_router="topk", flaming_topk=2, flaming_io_functions=io, flaming_io_context_window=6,
                flaming_aux_loss_coeff=1e-2)


def config(overrides: dict) -> NeonConfig:
    sizes = dict(tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
                 pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
                 context_parallel_size=parallel_state.get_context_parallel_world_size())
    return NeonConfig(**{**TINY, **overrides}, **sizes, sequence_parallel=sizes["tensor_model_parallel_size"] > 1,
                      expert_tensor_parallel_size=1, pipeline_dtype=torch.float32)


def batches(documents: bool, masked: bool) -> list:
    """The same two micro-batches at every step (the loss must fall on them); `masked`: no loss on
    the first 6 tokens (chunk 0 and half of chunk 1: at CP=2, rank 0 keeps 4 loss tokens of each
    sequence, rank 1 keeps 6)."""
    step = [batch | ({"documents": DOCUMENTS.expand(MB, SEQ).clone()} if documents else {})
            for batch in random_batches(MICRO, vocab=TINY["vocab_size"], micro_batch=MB, seq=SEQ, seed=3)]
    for batch in step if masked else ():
        batch["loss_mask"][:, :6] = 0
    return step * STEPS


def train(variants: dict, full_grads: bool = False) -> dict:
    """{variant: (losses, grad norms, {param: reduced gradient after step 1} or None)} on this rank."""
    out = {}
    for name, overrides in variants.items():
        overrides = dict(overrides)
        documents, masked = overrides.pop("documents", False), overrides.pop("masked", False)
        cfg = config(overrides)
        torch.manual_seed(7)
        chunks = build_model_chunks(cfg, build_model, ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=False))
        data = iter(batches(documents, masked))
        first, grads = sgd_losses(chunks, cfg, data, steps=1, num_microbatches=MICRO, seq_length=SEQ,
                                  micro_batch_size=MB, lr=0.5), None
        if full_grads:
            grads = {n: p.main_grad.detach().clone() for n, p in chunks[0].module.named_parameters()}
        rest = sgd_losses(chunks, cfg, data, steps=STEPS - 1, num_microbatches=MICRO, seq_length=SEQ,
                          micro_batch_size=MB, lr=0.5)
        out[name] = (first[0] + rest[0], first[1] + rest[1], grads)
    return out


@pytest.fixture(scope="module")
def io_variant(tmp_path_factory):
    from tests.neon.test_flaming_moe_io import build_test_store
    from tests.neon.test_flaming_moe_io_frozen import write_frozen

    root = tmp_path_factory.mktemp("cp")
    return {"flaming-io": flaming_io(build_test_store(str(root / "store")), write_frozen(str(root / "frozen")))}


def assert_same_training(got: dict, expected: dict, full_grads: bool) -> None:
    for name, (losses, norms, grads) in expected.items():
        g_losses, g_norms, g_grads = got[name]
        assert losses[-1] < losses[0], f"{name}: training did not lower the loss"
        for param, grad in (grads or {}).items() if full_grads else ():
            scale = grad.abs().max().item()
            torch.testing.assert_close(g_grads[param], grad, atol=GRAD_RTOL * scale, rtol=0,
                                       msg=lambda m, n=name, p=param: f"{n} {p}: {m}")
        torch.testing.assert_close(g_losses, losses, atol=0, rtol=LOSS_RTOL, msg=lambda m, n=name: f"{n}: {m}")
        torch.testing.assert_close(g_norms, norms, atol=0, rtol=GRAD_RTOL, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.slow
def test_cp2_matches_one_process_for_every_attention(io_variant):
    variants = VARIANTS | io_variant
    (baseline,) = run_distributed(train, 1, kwargs=dict(variants=variants, full_grads=True), timeout=400)
    for rank_result in run_distributed(train, 2, cp=2, kwargs=dict(variants=variants, full_grads=True),
                                       timeout=400):
        assert_same_training(rank_result, baseline, full_grads=True)


LAYOUTS = {"cp2xtp2": dict(tp=2, etp=1), "pp2xcp2": dict(pp=2)}  # FlamingMoE functions are whole per TP rank
SOME = ["mistral", "diff-matched-window", "ngpt-diff-window", "flaming"]


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS, ids=list(LAYOUTS))
def test_cp2_with_tp_or_pp_matches_cp1(layout, io_variant):
    variants = {n: VARIANTS[n] for n in SOME} | io_variant
    base = run_distributed(train, 2, **LAYOUTS[layout], kwargs=dict(variants=variants), timeout=400)
    got = run_distributed(train, 4, cp=2, **LAYOUTS[layout], kwargs=dict(variants=variants), timeout=400)
    last = [r for r in base if next(iter(r.values()))[0][0] is not None][-1]  # the last stage's losses
    for rank_result in got:
        if next(iter(rank_result.values()))[0][0] is not None:
            assert_same_training(rank_result, last, full_grads=False)
