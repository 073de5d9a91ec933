"""Training on megatron-core's pieces gives the same losses in every parallel layout.

Forward + backward + optimizer step with megatron DDP (plain and with the distributed
optimizer) at DP2, TP2 (+SP), PP2 (1F1B), PP2 x VPP2 (interleaved 1F1B) and TP2 x PP2 on 4
processes, against a single process. Dropout is off and every layout starts from the same
weights, so the layouts differ only in the order of fp32 additions (TP and SP split the
reductions, DP and the micro-batches split the sums over tokens, GEMM blocking follows the shard
shapes).

Bound. The forward to the loss has R = 26 reductions (4 layers x 6, the head, the logsumexp) of
at most n = 128 terms; a random-walk estimate of the reordering error is R * sqrt(n) * 2^-24 =
1.8e-5 of the values' magnitude, so losses must agree to 2e-5 relative. The gradient norm goes
through the backward too (twice the reductions): 4e-5. Adam turns a rounding-level difference of
a near-zero gradient g_i into an update difference of up to lr, but the loss feels it only as
lr * |g_i|, itself at rounding level, so the later steps keep these bounds. A layout bug (a
missing all-reduce, a wrong data-parallel average, a dropped micro-batch) moves the loss or the
norm by far more than 1e-3 relative."""

import pytest
import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig

from neon.model import build_model
from neon.training.optim import build_optimizer
from neon.training.step import build_model_chunks, train_step
from tests.neon.test_mistral_parity import reference_mistral, tiny_config
from tests.parity import load_stage

GLOBAL_BATCH, SEQ, STEPS = 4, 16, 3
LOSS_RTOL, GRAD_NORM_RTOL = 2e-5, 4e-5  # see the module docstring


def global_batches(vocab: int):
    gen = torch.Generator().manual_seed(5)
    for _ in range(STEPS):
        tokens = torch.randint(0, vocab, (GLOBAL_BATCH, SEQ + 1), generator=gen)
        yield dict(tokens=tokens[:, :-1], labels=tokens[:, 1:],
                   loss_mask=torch.ones(GLOBAL_BATCH, SEQ),
                   position_ids=torch.arange(SEQ).expand(GLOBAL_BATCH, SEQ))


def micro_batches(batch: dict, dp_rank: int, dp_size: int, micro: int = 1) -> list:
    rows = GLOBAL_BATCH // dp_size
    mine = {k: v[dp_rank * rows:(dp_rank + 1) * rows] for k, v in batch.items()}
    return [{k: v[i:i + micro] for k, v in mine.items()} for i in range(0, rows, micro)]


def train_losses(distributed_optimizer: bool = True):
    tp = parallel_state.get_tensor_model_parallel_world_size()
    cfg = tiny_config(sequence_parallel=tp > 1)
    ddp = DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                        use_distributed_optimizer=distributed_optimizer)
    chunks = build_model_chunks(cfg, build_model, ddp_config=ddp)
    hf_state = reference_mistral(cfg).state_dict()
    for chunk in chunks:
        load_stage(chunk.module, hf_state, cfg)
    optimizer = build_optimizer(chunks, OptimizerConfig(
        optimizer="adam", lr=1e-2, weight_decay=0.01, clip_grad=1.0,
        use_distributed_optimizer=distributed_optimizer))
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    losses, norms = [], []
    for batch in global_batches(cfg.vocab_size):
        micro = micro_batches(batch, dp_rank, dp_size)
        data = [iter(micro) for _ in chunks] if len(chunks) > 1 else iter(micro)
        result = train_step(chunks, optimizer, data, cfg, num_microbatches=len(micro),
                            seq_length=SEQ, micro_batch_size=1)
        losses.append(result.loss)
        norms.append(result.grad_norm)
    return dict(losses=losses, grad_norms=norms)


def last_stage_losses(results):
    found = [r for r in results if r["losses"][0] is not None]
    assert found, "no rank reported a loss"
    return found[-1]


@pytest.fixture(scope="module")
def baseline():
    (result,) = run(1, {})
    return result


def run(world, layout, **kwargs):
    from tests.dist import run_distributed

    return run_distributed(train_losses, world, **layout, kwargs=kwargs, timeout=300)


LAYOUTS = [
    (2, {}, False),
    (2, {}, True),
    (2, {"tp": 2}, True),
    (2, {"pp": 2}, True),
    (2, {"pp": 2, "vpp": 2}, True),
    (4, {"tp": 2, "pp": 2}, True),
]
LAYOUT_IDS = ["dp2-ddp", "dp2-distopt", "tp2-sp", "pp2-1f1b", "pp2-vpp2-interleaved", "tp2xpp2"]


@pytest.mark.slow
@pytest.mark.parametrize("world,layout,distopt", LAYOUTS, ids=LAYOUT_IDS)
def test_layout_matches_single_process(baseline, world, layout, distopt):
    got = last_stage_losses(run(world, layout, distributed_optimizer=distopt))
    assert baseline["losses"][-1] < baseline["losses"][0], "training did not lower the loss"
    torch.testing.assert_close(got["losses"], baseline["losses"], atol=0, rtol=LOSS_RTOL)
    torch.testing.assert_close(got["grad_norms"], baseline["grad_norms"], atol=0, rtol=GRAD_NORM_RTOL)
