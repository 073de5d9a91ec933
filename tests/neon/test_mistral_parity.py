"""With every Neon feature off, the megatron Neon model IS transformers' Mistral: same logits,
at TP=1, TP=2 with sequence parallelism, and PP=2, in real gloo processes."""

import pytest
import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
from transformers import MistralConfig, MistralForCausalLM

from neon.config import NeonConfig
from neon.model import build_model
from neon.state_dict_adapter import hf_to_megatron, megatron_to_hf, mistral_hf_config
from tests.dist import run_distributed

TINY = dict(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2,
            ffn_hidden_size=96, vocab_size=128, max_position_embeddings=64, sliding_window=5,
            rope_theta=10000.0)
BATCH, SEQ = 2, 16


def tiny_config(**overrides) -> NeonConfig:
    return NeonConfig(**{**TINY, **overrides},
                      tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
                      pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
                      virtual_pipeline_model_parallel_size=(
                          parallel_state.get_virtual_pipeline_model_parallel_world_size()),
                      pipeline_dtype=torch.float32)


def reference_mistral(cfg: NeonConfig, seed: int = 0) -> MistralForCausalLM:
    torch.manual_seed(seed)
    hf_cfg = MistralConfig(**mistral_hf_config(cfg), initializer_range=0.1)
    hf_cfg._attn_implementation = "eager"
    return MistralForCausalLM(hf_cfg).eval()


def load_stage(model, hf_state: dict, cfg: NeonConfig) -> None:
    """Load this rank's shard of an HF state dict into a megatron stage (strictly)."""
    sd = hf_to_megatron(
        hf_state, cfg,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        tp_size=parallel_state.get_tensor_model_parallel_world_size(),
        layer_offset=get_transformer_layer_offset(cfg, vp_stage=model.vp_stage),
        num_layers=len(model.decoder.layers),
        pre_process=model.pre_process, post_process=model.post_process)
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


def check_mistral_parity(sequence_parallel: bool = False):
    cfg = tiny_config(sequence_parallel=sequence_parallel)
    hf = reference_mistral(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens).logits
    model = build_model(cfg, pre_process=parallel_state.is_pipeline_first_stage(),
                        post_process=parallel_state.is_pipeline_last_stage())
    load_stage(model, hf.state_dict(), cfg)
    model.eval()
    with torch.no_grad():
        logits = forward_logits(model, cfg, tokens)
    # the mapping back to HF gives the same tensors (this stage, this TP rank's view joined)
    shards = [None] * parallel_state.get_tensor_model_parallel_world_size()
    torch.distributed.all_gather_object(shards, {k: v for k, v in model.state_dict().items()
                                                 if torch.is_tensor(v)},
                                        group=parallel_state.get_tensor_model_parallel_group())
    back = megatron_to_hf(shards, cfg, layer_offset=get_transformer_layer_offset(cfg))
    hf_state = hf.state_dict()
    roundtrip = all(torch.equal(back[k], hf_state[k]) for k in back) and len(back) > 0
    diff = None if logits is None else (logits - expected).abs().max().item()
    return dict(diff=diff, roundtrip=roundtrip, scale=expected.abs().max().item())


@pytest.mark.parametrize("world,layout,sp", [
    (1, {}, False),
    (2, {"tp": 2}, True),
    (2, {"pp": 2}, False),
], ids=["tp1", "tp2-sp", "pp2"])
def test_logits_match_transformers_mistral(world, layout, sp):
    results = run_distributed(check_mistral_parity, world, **layout,
                              kwargs={"sequence_parallel": sp})
    diffs = [r["diff"] for r in results if r["diff"] is not None]
    assert diffs, "no rank produced logits"
    assert all(r["roundtrip"] for r in results), "HF -> megatron -> HF changed a tensor"
    assert results[-1]["scale"] > 0.1, "reference logits are degenerate"
    assert max(diffs) <= 1e-4, diffs
