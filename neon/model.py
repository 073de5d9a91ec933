"""Build a Neon model: megatron-core's GPTModel with the Neon layer spec, for any pipeline stage."""

from __future__ import annotations

from typing import Optional

from megatron.core.models.gpt import GPTModel

from neon.config import NeonConfig
from neon.features import active
from neon.flaming.io_model import IOGPTModel
from neon.layer_spec import get_neon_block_spec


def build_model(
    config: NeonConfig,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: Optional[int] = None,
    use_te: Optional[bool] = None,
) -> GPTModel:
    """One pipeline stage (the whole model when pipeline parallelism is off).

    With FlamingMoE's global bank, the stage also owns a replica of the bank's functions as
    `flaming_global_functions` (see neon/flaming/block.py)."""
    model_class = IOGPTModel if config.flaming_io_functions else GPTModel  # FlamingMoE IO: context
    model = model_class(
        config=config,
        transformer_layer_spec=get_neon_block_spec(config, use_te=use_te, vp_stage=vp_stage),
        vocab_size=config.vocab_size,
        max_sequence_length=config.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=config.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=config.rope_theta,
        vp_stage=vp_stage,
    )
    for feature in active(config):  # e.g. FlamingMoE's global bank, nGPT's s_z and unit-norm weights
        feature.attach(model, config, post_process)
    return model
