"""megatron_plugins/logs.py: building a model whose layers have feature MLPs (nGPT's) logs no
"Unknown MLP type" line; megatron's other transformer-layer log lines still pass."""

import logging

from tests.dist import run_distributed


def layer_log_lines() -> list[str]:
    import torch

    from neon.config import NeonConfig
    from neon.model import build_model

    lines = []

    class Collect(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    logger = logging.getLogger("megatron.core.transformer.transformer_layer")
    logger.addHandler(Collect())
    logger.setLevel(logging.INFO)
    build_model(NeonConfig(num_layers=2, hidden_size=16, num_attention_heads=2, vocab_size=32, ngpt=True,
                           pipeline_dtype=torch.float32))
    logger.warning("another line")
    return lines


def test_feature_mlps_build_without_the_unknown_mlp_line():
    [lines] = run_distributed(layer_log_lines, 1)
    assert "another line" in lines
    assert not [line for line in lines if "Unknown MLP type" in line], lines
