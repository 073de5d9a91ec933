"""With every Neon feature off, the megatron Neon model IS transformers' Mistral: same logits,
at TP=1, TP=2 with sequence parallelism, and PP=2, in real gloo processes."""

import pytest
import torch
from megatron.core import parallel_state
from transformers import MistralConfig, MistralForCausalLM

from neon.config import NeonConfig
from neon.state_dict_adapter import mistral_hf_config
from tests.dist import run_distributed
from tests.parity import assert_matches, check_against_reference

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


def check_mistral_parity(sequence_parallel: bool = False):
    cfg = tiny_config(sequence_parallel=sequence_parallel)
    tokens = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    return check_against_reference(cfg, reference_mistral(cfg), tokens)


@pytest.mark.parametrize("world,layout,sp", [
    (1, {}, False),
    (2, {"tp": 2}, True),
    (2, {"pp": 2}, False),
], ids=["tp1", "tp2-sp", "pp2"])
def test_logits_match_transformers_mistral(world, layout, sp):
    results = run_distributed(check_mistral_parity, world, **layout,
                              kwargs={"sequence_parallel": sp})
    assert_matches(results, f"mistral {layout} sp={sp}")  # logits, mapping round trip
