"""The megatron Neon model against a Hugging Face reference, in real gloo processes: one helper for
the Mistral, DiffAttention, nGPT and FlamingMoE parity tests.

In each rank, `check_against_reference(cfg, hf, tokens, labels, adam)` loads the reference's
weights into this rank's megatron stage (`load_stage`), compares the logits, maps the stage back
to HF names (exactly the reference's tensors), and with `adam` takes one training step on both
sides (megatron's DDP, optimizer and scheduler vs torch AdamW, plus `normalize_ngpt_weights()` for
nGPT). `assert_matches(per_rank, what)` checks the per-rank results in the test process against
the bounds below.

How far apart two correct fp32 implementations may be (the bounds, derived once here)
--------------------------------------------------------------------------------------
Both sides compute the same function in float32 (unit roundoff u = 2^-24), summing in different
orders: fused vs separate projections, tensor-parallel partial sums, SDPA vs explicit softmax,
and whatever vector width and FMA use the CPU's BLAS picks (that is where Intel and AMD differ).

- One reduction of at most n terms: |error| <= gamma_n * sum|terms|, gamma_n = n u / (1 - n u)
  (Higham, Accuracy and Stability of Numerical Algorithms, 3.1), whatever the order.
- The logits come out of R sequential reductions, R = REDUCTIONS_PER_LAYER * layers + 2 (each
  layer with every feature on: input norm, qkv, q/k norm, scores, probs x V, head norm, output
  projection, residual norm, FlamingMoE router and two function matmuls and residual norm, MLP
  norm, fc1, fc2, residual norm; then the final norm and the output layer), each of at most
  n = widest reduction (hidden, ffn, seq or the attention width). The norms keep activations O(1)
  between reductions, so relative errors add: |dz| <= R gamma_n max(1, max|z|) = `logits_bound`.
- The loss (mean cross-entropy): log-sum-exp and the picked logit are each 1-Lipschitz in the
  max-norm, so |dloss| <= 2 |dz| + gamma_(vocab + tokens) max(1, loss).
- Gradients: the backward pass runs about twice the forward's reductions, so |dg| <= 2 R gamma_n
  G with G the largest reference gradient (the scale of the summands) = `grad_bound`.
- One Adam step (step 1, bias-corrected: m = g, v = g^2) moves a weight by lr g / (|g| + eps),
  the same on both sides up to the gradient difference. d/dg [g / (|g| + eps)] = eps / (|g| + eps)^2,
  largest where |g| is smallest: near zero a rounding-level gradient difference is amplified by
  up to 1/eps (and two gradients at rounding level with different signs give up to 2 lr). So a
  coordinate with reference gradient g may differ by at most
      lr * min(2, dg * eps / (max(|g| - dg, 0) + eps)^2)  +  2 u |w|        (`step_bounds`)
  (the last term: rounding of the update and of the decoupled weight decay w (1 - lr wd)).
  nGPT renormalises each weight vector after the step, which mixes the coordinates of a vector:
  |Norm(w + d) - Norm(w)| <= 2 |d| / |w|, so under nGPT every coordinate of a tensor gets twice
  the tensor's largest bound.
The references' results on one machine are typically 10-100x inside these bounds; a wrong
mapping, layout or optimizer rule gives differences of the order of the values themselves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.optimizer import OptimizerConfig
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from neon.config import NeonConfig
from neon.model import build_model
from neon.state_dict_adapter import hf_to_megatron, megatron_to_hf
from neon.training.optim import build_optimizer, build_scheduler
from neon.training.step import build_model_chunks, train_step

U = 2.0 ** -24  # fp32 unit roundoff
REDUCTIONS_PER_LAYER = 16


def parallel_config(**settings) -> NeonConfig:
    """A float32 NeonConfig with this process group's TP, PP and EP sizes."""
    return NeonConfig(**settings,
                      tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
                      pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
                      expert_model_parallel_size=parallel_state.get_expert_model_parallel_world_size(),
                      pipeline_dtype=torch.float32)


# --- bounds (see the module docstring) ---------------------------------------------------------

def gamma(n: int) -> float:
    return n * U / (1 - n * U)


def _reductions(cfg: NeonConfig, seq: int) -> tuple[int, int]:
    """(R sequential reductions, widest reduction n) of a forward pass."""
    widest = max(cfg.hidden_size, cfg.ffn_hidden_size, seq, 2 * cfg.num_attention_heads * cfg.head_dim)
    return REDUCTIONS_PER_LAYER * cfg.num_layers + 2, widest


def logits_bound(cfg: NeonConfig, seq: int, scale: float) -> float:
    r, n = _reductions(cfg, seq)
    return r * gamma(n) * max(1.0, scale)


def loss_bound(cfg: NeonConfig, seq: int, scale: float, loss: float, tokens: int) -> float:
    return 2 * logits_bound(cfg, seq, scale) + gamma(cfg.vocab_size + tokens) * max(1.0, loss)


def grad_bound(cfg: NeonConfig, seq: int, grad_max: float) -> float:
    r, n = _reductions(cfg, seq)
    return 2 * r * gamma(n) * grad_max


def step_bounds(grad: torch.Tensor, weight: torch.Tensor, dg: float, lr: float, eps: float,
                renormalised: bool) -> torch.Tensor:
    """Per-coordinate bound on |megatron - reference| after one Adam step (module docstring)."""
    g = grad.abs().double()
    amplified = lr * torch.clamp(dg * eps / ((g - dg).clamp_min(0) + eps) ** 2, max=2.0)
    bound = amplified + 2 * U * weight.abs().double()
    return torch.full_like(bound, 2 * bound.max().item()) if renormalised else bound


# --- in each rank -----------------------------------------------------------------------------

def load_stage(model, hf_state: dict, cfg: NeonConfig) -> None:
    """Load this rank's shard (TP rank, pipeline stage, EP rank) of an HF state dict, strictly."""
    sd = hf_to_megatron(
        hf_state, cfg,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        tp_size=parallel_state.get_tensor_model_parallel_world_size(),
        layer_offset=get_transformer_layer_offset(cfg, vp_stage=model.vp_stage),
        num_layers=len(model.decoder.layers),
        pre_process=model.pre_process, post_process=model.post_process,
        ep_rank=parallel_state.get_expert_model_parallel_rank(),
        ep_size=parallel_state.get_expert_model_parallel_world_size())
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    assert not missing and not unexpected, (missing, unexpected)


def forward_logits(model, cfg: NeonConfig, tokens: torch.Tensor):
    """Full-vocabulary logits on the last pipeline stage (None elsewhere), via megatron's
    forward-only schedule so that pipeline stages exchange activations as in training."""
    positions = torch.arange(tokens.size(1)).expand_as(tokens)

    def step(_iterator, m):
        return m(tokens, positions, None), None

    out = get_forward_backward_func()(
        forward_step_func=step, data_iterator=iter([None]), model=model, num_microbatches=1,
        seq_length=tokens.size(1), micro_batch_size=tokens.size(0), forward_only=True)
    if not parallel_state.is_pipeline_last_stage():
        return None
    return gather_from_tensor_model_parallel_region(out[0])


def _gather(obj, group, size: int) -> list:
    out = [None] * size
    torch.distributed.all_gather_object(out, obj, group=group)
    return out


def tp_gather(obj) -> list:
    return _gather(obj, parallel_state.get_tensor_model_parallel_group(),
                   parallel_state.get_tensor_model_parallel_world_size())


def stage_hf_state(model, cfg: NeonConfig) -> dict:
    """This pipeline stage in HF names: TP shards joined, every EP rank's functions."""
    own = {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    ep = parallel_state.get_expert_model_parallel_world_size()
    expert_shards = _gather(own, parallel_state.get_expert_model_parallel_group(), ep) if ep > 1 else None
    return megatron_to_hf(tp_gather(own), cfg, layer_offset=get_transformer_layer_offset(cfg),
                          expert_shards=expert_shards)


def check_against_reference(cfg: NeonConfig, hf, tokens: torch.Tensor, labels: torch.Tensor | None = None,
                            adam: dict | None = None, probe=None) -> dict:
    """Logits, the mapping back to HF and (with `adam`: lr, betas, eps, weight_decay) one training
    step of this rank's stage vs the reference `hf`. `probe(chunks, drawn)` adds its own entries
    after the forward (drawn: the stage's state dict as megatron initialised it)."""
    hf_state = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    chunks = build_model_chunks(cfg, build_model)
    model = chunks[0].module
    drawn = {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    load_stage(model, hf_state, cfg)
    model.eval()
    with torch.no_grad():
        expected = hf.eval()(tokens).logits
        logits = forward_logits(chunks[0], cfg, tokens)
    back = stage_hf_state(model, cfg)
    result = dict(
        names=sorted(back), roundtrip=len(back) > 0 and all(torch.equal(back[k], hf_state[k]) for k in back),
        logit_diff=None if logits is None else (logits - expected).abs().max().item(),
        scale=expected.abs().max().item(), seq=tokens.size(1), cfg=cfg_dims(cfg))
    if probe is not None:
        result.update(probe(chunks, drawn))
    if adam is not None:
        result.update(_one_step(chunks, cfg, hf, hf_state, tokens, labels, adam))
    return result


def cfg_dims(cfg: NeonConfig) -> dict:
    """What the bounds read from a config (picklable, for the test process)."""
    return dict(num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.ffn_hidden_size,
                num_attention_heads=cfg.num_attention_heads, kv_channels=cfg.head_dim,
                vocab_size=cfg.vocab_size, ngpt=cfg.ngpt)


def _one_step(chunks, cfg, hf, hf_state, tokens, labels, adam) -> dict:
    """One megatron step (DDP, optimizer, scheduler) vs torch AdamW on the reference: returns the
    loss difference and the largest |megatron - reference| / step_bounds over the stage."""
    model = chunks[0].module
    model.train()
    lr, (beta1, beta2), eps, wd = adam["lr"], adam["betas"], adam["eps"], adam["weight_decay"]
    opt = build_optimizer(chunks, OptimizerConfig(
        optimizer="adam", lr=lr, weight_decay=wd, adam_beta1=beta1, adam_beta2=beta2, adam_eps=eps,
        clip_grad=0.0, bf16=False, fp16=False))
    # megatron's scheduler sets each group's lr and weight decay (wd_mult 0 for 1-D parameters)
    build_scheduler(opt, lr=lr, min_lr=lr, warmup_init=lr, warmup_iters=0, decay_iters=1,
                    decay_style="constant", weight_decay=wd)
    batch, seq = tokens.size(0), tokens.size(1)
    step = train_step(chunks, opt, iter([dict(tokens=tokens, labels=labels, loss_mask=torch.ones(batch, seq),
                                              position_ids=torch.arange(seq).expand(batch, seq))]),
                      cfg, num_microbatches=1, seq_length=seq, micro_batch_size=batch)
    hf.train()
    decay = [p for p in hf.parameters() if p.ndim >= 2]  # megatron: no decay on 1-D parameters
    no_decay = [p for p in hf.parameters() if p.ndim < 2]
    hf_opt = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
                               lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=wd)
    loss = F.cross_entropy(hf(tokens).logits.flatten(0, 1), labels.flatten())
    loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in hf.named_parameters()}
    hf_opt.step()
    if cfg.ngpt:
        hf.normalize_ngpt_weights()
    after, new_hf = stage_hf_state(model, cfg), hf.state_dict()
    dg = grad_bound(cfg, seq, max(g.abs().max().item() for g in grads.values()))
    ratio, worst = max((((after[k] - new_hf[k]).abs().double()
                         / step_bounds(grads[k], hf_state[k], dg, lr, eps, cfg.ngpt)).max().item(), k)
                       for k in after)
    return dict(loss=loss.item(), loss_diff=None if step.loss is None else abs(step.loss - loss.item()),
                step_ratio=ratio, worst=worst, tokens=tokens.numel(),
                moved={k: (new_hf[k] - hf_state[k]).abs().max().item() for k in after})


# --- in the test process ----------------------------------------------------------------------

class _Dims:
    def __init__(self, dims: dict):
        self.__dict__.update(dims)
        self.head_dim = dims["kv_channels"]


def assert_matches(per_rank: list[dict], what: str, min_moved: float | None = None) -> None:
    """Every rank's results for one case against the bounds of the module docstring; `min_moved`:
    with a training step, every tensor must have moved by more than this (the step mattered)."""
    logit_diffs = [(r["logit_diff"], r["scale"]) for r in per_rank if r["logit_diff"] is not None]
    assert logit_diffs, f"{what}: no rank produced logits"
    assert all(r["roundtrip"] for r in per_rank), f"{what}: HF -> megatron -> HF changed a tensor"
    cfg, seq = _Dims(per_rank[0]["cfg"]), per_rank[0]["seq"]
    for diff, scale in logit_diffs:
        assert scale > 0.1, f"{what}: reference logits are degenerate (max |z| = {scale})"
        bound = logits_bound(cfg, seq, scale)
        assert diff <= bound, f"{what}: logits differ by {diff:.3g} > {bound:.3g}"
    if "step_ratio" not in per_rank[0]:
        return
    losses = [r for r in per_rank if r["loss_diff"] is not None]
    assert losses, f"{what}: no rank produced the loss"
    scale = max(s for _, s in logit_diffs)
    for r in losses:
        bound = loss_bound(cfg, seq, scale, r["loss"], r["tokens"])
        assert r["loss_diff"] <= bound, f"{what}: loss differs by {r['loss_diff']:.3g} > {bound:.3g}"
    ratio, worst = max((r["step_ratio"], r["worst"]) for r in per_rank)
    assert ratio <= 1.0, f"{what}: {worst} after one step differs by {ratio:.3g} x its bound"
    if min_moved is not None:
        moved = {k: v for r in per_rank for k, v in r["moved"].items()}
        still = sorted(k for k, v in moved.items() if v <= min_moved)
        assert not still, f"{what}: the reference step did not move {still}"
