"""Build a Neon model: megatron-core's GPTModel with the Neon layer spec, for any pipeline stage."""

from __future__ import annotations

from typing import Optional

from megatron.core.models.gpt import GPTModel

from neon.config import NeonConfig
from neon.features import active
from neon.layer_spec import get_neon_block_spec


def build_model(
    config: NeonConfig,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: Optional[int] = None,
    use_te: Optional[bool] = None,
) -> GPTModel:
    """One pipeline stage (the whole model when pipeline parallelism is off): megatron's GPTModel
    (or the subclass an active feature asks for, `model_class`), then each active feature's
    `attach` (e.g. a replica of a bank shared by every layer, nGPT's s_z and unit-norm weights)."""
    for feature in active(config):  # external sources opened first: a bad one fails before anything is built
        feature.prepare(config)
    model = model_class(config)(
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
    for feature in active(config):
        feature.attach(model, config, post_process)
    return model


def model_class(config: NeonConfig) -> type:
    """GPTModel, or the one subclass an active feature needs (`Feature.model_class`)."""
    wanted = {f.name: cls for f in active(config) if (cls := f.model_class(config)) is not None}
    if len(wanted) > 1:
        raise ValueError(f"features {sorted(wanted)} each need their own model class ({wanted}); "
                         f"one of them must build on the other's")
    return next(iter(wanted.values()), GPTModel)
