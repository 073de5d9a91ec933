"""FlamingMoE IO functions with nGPT: the IO outputs join the layer through nGPT's normalized
update (the block's r, IO terms included, goes through h <- Norm(h + |alpha_F| (Norm(r) - h))),
W_out columns and W_q rows are kept on the unit sphere, and a model with a store and a callable
trains (finite losses that fall over a few steps on a repeated batch)."""

import torch
from megatron.core import parallel_state
from megatron.core.optimizer import OptimizerConfig

from neon.config import NeonConfig
from neon.flaming.encoder import describe
from neon.flaming.store_build import write_store
from neon.model import build_model
from neon.ngpt import NORM_DIM_ATTR
from neon.training.optim import build_optimizer
from neon.training.step import build_model_chunks, train_step
from tests.dist import run_distributed

VOCAB, SEQ, MB = 32, 8, 2


def train_ngpt_io(store: str) -> dict:
    cfg = NeonConfig(
        num_layers=2, hidden_size=16, num_attention_heads=2, ffn_hidden_size=24, vocab_size=VOCAB,
        max_position_embeddings=16, ngpt=True, flaming_moe="between", flaming_layer_functions=1,
        flaming_router="topk", flaming_topk=2, flaming_io_context_window=4, pipeline_dtype=torch.float32,
        flaming_io_functions=[f"name=facts,kind=store,source={store},query=hidden,topk=2",
                              "name=add,kind=callable,source=tests.neon.io_callables:sum_last_two,width=2"],
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
    assert sorted(r["tagged"]) == sorted(
        f"decoder.layers.{i}.flaming_moe.layer_bank.experts.local_experts.{j}.{p}"
        for i in (0, 1) for j, p in ((1, "out_proj.weight"), (1, "query_proj.weight"), (2, "out_proj.weight")))
    assert all(d == (0 if "out_proj" in n else 1) for n, d in r["tagged"].items())
    for name, norms in r["out_norms"].items():  # unit columns after 6 optimizer steps (fp32 rounding)
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5), (name, norms)
    losses = r["losses"]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 0.05, losses
