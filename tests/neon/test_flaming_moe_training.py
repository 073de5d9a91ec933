"""FlamingMoE in training: the global bank under pipeline parallelism, evaluation determinism,
and the load-balancing loss moving the routing. Real megatron DDP, optimizer and schedules."""

import math

import pytest
import torch
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import apply_factories
from megatron.core.dist_checkpointing.validation import determine_global_metadata, validate_sharding_integrity
from megatron.core.optimizer import OptimizerConfig

from neon.config import NeonConfig
from neon.flaming import aux_loss_report, reset_usage, usage_counts
from neon.model import build_model
from neon.training.optim import build_optimizer
from neon.training.step import build_model_chunks, train_step
from tests.dist import run_distributed
from tests.train_helpers import random_batches

VOCAB, SEQ, MB = 32, 8, 2


def tiny_flaming_config(**overrides) -> NeonConfig:
    fields = dict(num_layers=2, hidden_size=16, num_attention_heads=2, ffn_hidden_size=24, vocab_size=VOCAB,
                  max_position_embeddings=16, flaming_moe="between", flaming_global_functions=4,
                  flaming_layer_functions=4, flaming_layer_kind="lowrank", flaming_lowrank_rank=4,
                  flaming_router="gumbel", flaming_aux_loss_coeff=1e-2, flaming_z_loss_coeff=1e-3,
                  pipeline_dtype=torch.float32,
                  pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
                  expert_model_parallel_size=parallel_state.get_expert_model_parallel_world_size())
    return NeonConfig(**{**fields, **overrides})


def batches(n: int, seed: int = 0):
    return random_batches(n, vocab=VOCAB, micro_batch=MB, seq=SEQ, seed=seed)


def global_bank_params(chunks) -> dict:
    return {n: p.detach().clone() for n, p in chunks[0].module.named_parameters()
            if n.startswith("flaming_global_functions.")}


STEPS, MICROBATCHES = 4, 2


def train_pp(sync: bool, steps: int = STEPS):
    cfg = tiny_flaming_config()
    cfg.has_cond_embedder = sync  # False: the control run without the pipeline-stage gradient sum
    chunks = build_model_chunks(cfg, build_model)
    opt = build_optimizer(chunks, OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.0, bf16=False))
    before = global_bank_params(chunks)
    data = batches(steps * MICROBATCHES)
    for _ in range(steps):
        train_step(chunks, opt, data, cfg, num_microbatches=MICROBATCHES, seq_length=SEQ, micro_batch_size=MB)
    return chunks, before, global_bank_params(chunks)


def check_global_bank_under_pp():
    group = parallel_state.get_pipeline_model_parallel_group()
    out = {}
    for sync in (True, False):
        chunks, before, after = train_pp(sync)
        both = [None, None]
        torch.distributed.all_gather_object(both, after, group=group)
        report = aux_loss_report(num_microbatches=STEPS * MICROBATCHES)  # the training log's router losses
        out[sync] = dict(identical=all(torch.equal(both[0][n], both[1][n]) for n in after), report=report,
                         moved=max((after[n] - before[n]).abs().max().item() for n in after),
                         names=sorted(after))
    # the checkpoint holds the global bank once: one main replica per key across the stages
    sharded = chunks[0].module.sharded_state_dict()
    apply_factories(sharded)
    replicas = {k: tuple(v.replica_id) for k, v in sharded.items()
                if k.startswith("flaming_global_functions.") and hasattr(v, "replica_id")}
    # megatron's own pre-save check: main replicas cover every tensor exactly once
    validate_sharding_integrity(determine_global_metadata(sharded)[1])
    out["replicas"] = replicas
    return out


@pytest.mark.slow
def test_global_bank_replicas_stay_identical_under_pp():
    ranks = run_distributed(check_global_bank_under_pp, 2, pp=2, timeout=300)
    for r in ranks:
        assert r[True]["names"], "no global bank parameters on a stage"
        assert r[True]["moved"] > 1e-3, "the optimizer did not change the global bank"
        assert r[True]["identical"], "global bank replicas differ between pipeline stages"
        assert not r[False]["identical"], "control: without the stage gradient sum the replicas should drift"
        report = r[True]["report"]
        assert sorted(report) == [f"flaming_{b}_{loss}" for b in ("global", "layer")
                                  for loss in ("load_balancing_loss", "z_loss")], report
        for name, value in report.items():  # balancing: n * sum_i f_i P_i, 1 when perfectly even
            assert (0.2 < value < 4.0) if "balancing" in name else (0.0 < value < 10.0), (name, value)
    keys = [set(r["replicas"]) for r in ranks]
    assert keys[0] == keys[1] and keys[0], "stages give different checkpoint keys for the global bank"
    for k in keys[0]:
        mains = [r["replicas"][k] for r in ranks if not any(r["replicas"][k])]
        assert len(mains) == 1, (k, [r["replicas"][k] for r in ranks])


# --- single process: evaluation determinism and the load-balancing loss --------------------------


def eval_determinism():
    cfg = tiny_flaming_config(flaming_router="gumbel", flaming_gumbel_temperature=0.5)
    model = build_model(cfg)
    tokens = next(batches(1))["tokens"]
    positions = torch.arange(SEQ).expand(MB, SEQ)
    outs = {}
    for mode in ("eval", "train"):
        getattr(model, mode)()
        runs = []
        for seed in (1, 2):
            torch.manual_seed(seed)  # a different noise stream each time
            with torch.no_grad():
                runs.append(model(tokens, positions, None))
        outs[mode] = torch.equal(runs[0], runs[1])
    return outs


def balance_run(aux_coeff: float, router: str, steps: int = 200):
    """Train a one-layer model from a router that sends every token to function 0; return the
    spread of the function usage over the last 50 steps: coefficient of variation of the token
    counts (0 = perfectly even) and the normalized entropy (1 = perfectly even)."""
    torch.manual_seed(0)
    n = 8
    cfg = tiny_flaming_config(num_layers=1, flaming_moe="mlp", flaming_global_functions=0, flaming_layer_functions=n,
                              flaming_layer_kind="linear", flaming_router=router, flaming_aux_loss_coeff=aux_coeff,
                              flaming_z_loss_coeff=0.0)
    model = build_model(cfg)
    bank = model.decoder.layers[0].mlp.layer_bank
    with torch.no_grad():
        bank.router.weight.zero_()
        bank.router.weight[0] = 0.5  # every normalized token prefers function 0 ...
        bank.router.weight[0, ::2] = 1.5  # ... not just by symmetry: a clear margin
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step, batch in enumerate(batches(steps, seed=1)):
        if step == steps - 50:
            reset_usage(model)
        loss = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    counts = next(iter(usage_counts(model).values())).double()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item() / math.log(n)
    cv = (counts.std(unbiased=False) / counts.mean()).item()
    return dict(cv=cv, entropy=entropy, counts=counts.tolist())


def single_process_checks():
    return dict(determinism=eval_determinism(),
                balance={(router, coeff): balance_run(coeff, router)
                         for router in ("topk", "gumbel") for coeff in (0.0, 0.1)})


@pytest.fixture(scope="module")
def single_process():
    return run_distributed(single_process_checks, 1, timeout=300)[0]


@pytest.mark.slow
def test_evaluation_is_deterministic(single_process):
    det = single_process["determinism"]
    assert det["eval"], "two evaluations of the same input differ"
    assert not det["train"], "control: Gumbel noise should make training forwards differ"


@pytest.mark.slow
@pytest.mark.parametrize("router", ["topk", "gumbel"])
def test_balancing_loss_evens_out_function_usage(single_process, router):
    off, on = single_process["balance"][(router, 0.0)], single_process["balance"][(router, 0.1)]
    assert on["cv"] < 0.5 * off["cv"], (off, on)
    assert on["entropy"] > off["entropy"], (off, on)
