"""Neon's one FLOP count (neon/flops.py) against hand counts, one per variant.

TINY: d_model 64, 8 query heads of 8, 4 key/value heads, SwiGLU 96, vocab 128, 2 layers, seq 32.
Multiply-adds (MACs) per token; FLOPs = 2 x 3 passes x (2 layers x layer + logits).

Mistral:   W_q, W_k, W_v, W_o = 64*64 + 2*64*32 + 64*64 = 12288
           MLP 3*64*96 = 18432;  logits 64*128 = 8192
           keys per query: 'half' 32/2 = 16, 'full' 32;  Q K^T + A V = 2 * keys * 64
           half: 6 * (2 * (12288 + 2048 + 18432) + 8192) = 442368
           full: 6 * (2 * (12288 + 4096 + 18432) + 8192) = 466944
"""

import io

import pytest
import torch

from neon.config import NeonConfig
from neon.features.diff_attention import MODES
from neon.flops import attention_keys, training_flops_per_token
from neon.io.encoder import describe
from neon.io.store import write_store
from neon.training.config.sections import LoggingConfig, ScheduleConfig
from neon.training.metrics import MetricsLogger

TINY = dict(num_layers=2, hidden_size=64, num_attention_heads=8, num_query_groups=4, ffn_hidden_size=96,
            vocab_size=128, max_position_embeddings=64)
SEQ = 32


def flops(causal="half", **switches) -> float:
    return training_flops_per_token(NeonConfig(**TINY, **switches), SEQ, causal=causal)


def test_mistral_at_half_and_full():
    assert flops() == 442368
    assert flops("full") == 466944
    # full recomputation runs the forward twice: 8 FLOPs per MAC, 8 * 73728
    assert flops(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1) == 589824


def test_sliding_window_keys():
    """Window 8 of 32: the query at position t sees min(t, 8) keys; averaged (continuously, as
    's/2' is for plain causal attention) 8 - 8^2 / (2*32) = 7 at half, 8 at full.
    half: 6 * (2 * (12288 + 2*7*64 + 18432) + 8192) = 6 * (2 * 31616 + 8192) = 428544."""
    assert attention_keys(32, 8, "half") == 7 and attention_keys(32, 8, "full") == 8
    assert attention_keys(32, None, "half") == 16 and attention_keys(32, 64, "half") == 16
    assert flops(sliding_window=8) == 428544
    with pytest.raises(ValueError, match="causal='quarter'"):
        attention_keys(32, None, "quarter")


def test_diff_attention_matched():
    """4 differential heads over 2 key/value heads: Q1, Q2, K1, K2 of width 8, V of width 16.
    qkv rows 2 * (2 heads * 2 * 8 + 2 * 8 + 16) = 128 (Mistral's 64 + 2*32): proj 64*128 + 64*64 = 12288
    both maps: 2 * 4 maps * (8 + 16) per key = 192 * 16 keys = 3072 (Mistral 2048)
    half: 6 * (2 * (12288 + 3072 + 18432) + 8192) = 454656"""
    assert flops(diff_attention="matched") == 454656


def test_diff_attention_expressive():
    """8 differential heads over 4 key/value heads, Q and K doubled, V of width 8.
    qkv rows 4 * (2 * 2 * 8 + 2 * 8 + 8) = 224: proj 64*224 + 64*64 = 18432
    both maps: 2 * 8 * (8 + 8) = 256 per key * 16 = 4096
    half: 6 * (2 * (18432 + 4096 + 18432) + 8192) = 540672"""
    assert flops(diff_attention="expressive") == 540672


@pytest.mark.skipif("v2" not in MODES, reason="diff_attention='v2' is not a DiffAttention layout yet")
def test_diff_attention_v2():
    """16 query heads of 8 over Mistral's 4 key/value heads, W_lambda 64 -> 8.
    proj 64 * (16*8 + 2*4*8) + 8*8*64 + 64*8 = 12288 + 4096 + 512 = 16896
    maps: 16 heads * (8 + 8) = 256 per key * 16 = 4096
    half: 6 * (2 * (16896 + 4096 + 18432) + 8192) = 522240"""
    assert flops(diff_attention="v2") == 522240


def test_ngpt_adds_no_matmuls():
    """nGPT's normalisations and scalings are elementwise (no term): Mistral's 442368; with
    the matched differential maps, the matched count 454656."""
    assert flops(ngpt=True) == 442368
    assert flops(ngpt=True, diff_attention="matched") == 454656


def test_flaming_between_linear_top1():
    """2 global + 2 per-layer linear functions (64 x 64), top-1, beside the MLP:
    each bank: router 64*2 + 1 * 64*64 = 4224; two banks 8448 per layer
    half: 6 * (2 * (32768 + 8448) + 8192) = 543744"""
    assert flops(flaming_moe="between", flaming_global_functions=2, flaming_layer_functions=2) == 543744


def test_flaming_mlp_swiglu_and_lowrank_top2():
    """In the MLP's place (no dense MLP term): 4 global SwiGLU functions of width 32, 2 per-layer
    low-rank functions of rank 4, top-2.
    global: router 64*4 + 2 * 3*64*32 = 256 + 12288 = 12544;  layer: 64*2 + 2 * 2*64*4 = 1152
    half: 6 * (2 * (12288 + 2048 + 12544 + 1152) + 8192) = 6 * (2 * 28032 + 8192) = 385536"""
    assert flops(flaming_moe="mlp", flaming_global_functions=4, flaming_global_kind="swiglu",
                 flaming_ffn_hidden_size=32, flaming_layer_functions=2, flaming_layer_kind="lowrank",
                 flaming_lowrank_rank=4, flaming_topk=2) == 385536


def test_flaming_io_functions_at_uniform_routing(tmp_path):
    """d_model 16, 2 heads of 8 (2 kv heads), SwiGLU 24, vocab 32, 2 layers, seq 8 (4 keys at half).
    Per-layer bank of 3, top-2: 1 linear (16*16 = 256); a store (key_dim 8, 2 value tokens
    embedded at 16, query='hidden', topk 2): W_q 16*8 + 2*8 rescored + 2*32 weighted + W_out 32*16
    = 128 + 16 + 64 + 512 = 720; a callable returning 2 tokens: W_out 32*16 = 512.
    bank: router 16*3 + 2 * (256 + 720 + 512) / 3 = 48 + 992 = 1040
    Mistral: proj 16*16 + 2*16*16 + 16*16 = 1024, maps 2*4*16 = 128, MLP 3*16*24 = 1152, logits 512
    half: 6 * (2 * (1024 + 128 + 1152 + 1040) + 512) = 6 * 7200 = 43200"""
    store = str(tmp_path / "store")
    write_store(store, describe("random:4", 3, 8, 32), [list(range(1, 20))], value_width=2)
    cfg = NeonConfig(num_layers=2, hidden_size=16, num_attention_heads=2, ffn_hidden_size=24, vocab_size=32,
                     max_position_embeddings=16, flaming_moe="between", flaming_layer_functions=1,
                     flaming_router="topk", flaming_topk=2, flaming_io_context_window=4,
                     flaming_io_functions=[f"name=facts,kind=store,source={store},query=hidden,topk=2",
                                           "name=add,kind=callable,source=tests.neon.io_callables:sum_last_two,"
                                           "width=2"],
                     pipeline_dtype=torch.float32)
    assert training_flops_per_token(cfg, 8) == 43200


def test_metrics_report_mfu_at_half_and_full(tmp_path):
    """One logged step of 2 x 32 tokens in 0.5 s on a device of peak 1e-4 TFLOP/s: 128 tokens/s,
    so mfu = 128 * 442368 / 1e8 = 0.566 and mfu_full_attention = 128 * 466944 / 1e8 = 0.598, in
    metrics.jsonl and on the console line."""
    import json

    stream = io.StringIO()
    logger = MetricsLogger(LoggingConfig(log_interval=1, peak_tflops=1e-4, progress_bar=False),
                           ScheduleConfig(train_iters=1, global_batch_size=2), seq_length=SEQ,
                           flops_per_token=flops(), flops_per_token_full_attention=flops("full"),
                           num_devices=1, run_dir=tmp_path, stream=stream)
    logger.train_step(iteration=1, loss=1.0, grad_norm=1.0, lr=1e-3, consumed_samples=2, step_time_s=0.5,
                      skipped=False)
    logger.close()
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert record["mfu"] == pytest.approx(128 * 442368 / 1e8, rel=1e-12)
    assert record["mfu_full_attention"] == pytest.approx(128 * 466944 / 1e8, rel=1e-12)
    assert record["tflops_per_device"] == pytest.approx(128 * 442368 / 1e12, rel=1e-12)
    line = stream.getvalue()
    assert "MFU: 56.6%" in line and "MFU (full attention): 59.8%" in line


def frozen_count(cfg, keys: float) -> float:
    """Multiply-adds per token of a MistralForCausalLM forward, from its config alone: per layer
    W_q, W_k, W_v, W_o, the SwiGLU MLP and 2 keys H d_h; the LM head once."""
    d, heads, kv = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or d // heads
    layer = d * heads * head_dim + 2 * d * kv * head_dim + heads * head_dim * d + 3 * d * cfg.intermediate_size
    return cfg.num_hidden_layers * (layer + 2 * keys * heads * head_dim) + d * cfg.vocab_size


def test_flaming_frozen_model_forward_once_per_stage(tmp_path):
    """A bank [1 linear, a `model` function] (top-2): the frozen MistralForCausalLM (d 24, 2 layers,
    2 heads of 12, 1 kv head, MLP 32, vocab 32) runs forward only, once per micro-batch and stage.
    Neon (d 16 as above, seq 8): bank router 16*2 + 2 * (256 + W_out 24*16) / 2 = 672 per layer;
    6 * (2 * (1024 + 128 + 1152 + 672) + 512) = 38784.
    Frozen, per token: layer 24*24 + 2*24*12 + 24*24 + 3*24*32 = 4032, x 2 + LM head 24*32 = 8832;
    attention 2 * 4 keys * 2 * 12 = 192 per layer: 9216 MACs, 2 * 9216 = 18432 FLOPs per stage.
    half: 38784 + 18432 = 57216; PP=2: + 18432 (both stages run it) = 75648; full recompute: the
    trained part x 8/6 (51712), the frozen forward not recomputed: 70144."""
    from transformers import AutoConfig

    from neon.flops import forward_only_flops_per_token
    from tests.neon.test_flaming_moe_io_frozen import write_frozen

    frozen = write_frozen(str(tmp_path / "frozen"))

    def cfg(**extra):
        extra.setdefault("flaming_io_functions", [f"name=a,kind=model,source={frozen},layer=1"])
        extra.setdefault("flaming_topk", 2)
        return NeonConfig(num_layers=2, hidden_size=16, num_attention_heads=2, ffn_hidden_size=24, vocab_size=32,
                          max_position_embeddings=16, flaming_moe="between", flaming_layer_functions=1,
                          flaming_router="topk", flaming_io_context_window=4, pipeline_dtype=torch.float32,
                          **extra)

    hf = AutoConfig.from_pretrained(frozen, local_files_only=True)
    assert frozen_count(hf, 4) == 9216 and frozen_count(hf, 8) == 9600  # the docstring's hand count
    assert forward_only_flops_per_token(cfg(), 8) == 2 * frozen_count(hf, 4)
    assert training_flops_per_token(cfg(), 8) == 57216
    assert training_flops_per_token(cfg(pipeline_model_parallel_size=2), 8) == 75648
    assert training_flops_per_token(cfg(recompute_granularity="full", recompute_method="uniform",
                                        recompute_num_layers=1), 8) == 70144
    # full attention: Neon's maps 2 * 8 * 16 = 256: 6 * (2 * 3104 + 512) = 40320; frozen 2 * 9600
    assert training_flops_per_token(cfg(), 8, causal="full") == 40320 + 2 * 9600
    # a second function on the same model shares its forward; the trained part gains its bank entry
    two = cfg(flaming_io_functions=[f"name=a,kind=model,source={frozen},layer=1",
                                    f"name=b,kind=model,source={frozen},layer=2"], flaming_topk=3)
    assert forward_only_flops_per_token(two, 8) == 2 * 9216
