"""GPTModel that builds the token context of FlamingMoE IO functions from its input ids.

Every pipeline stage receives the input ids (Neon's forward_step passes the batch to each
stage), so each stage builds the same context [s, b, 2 + W] (neon/flaming/io.py) in its own
forward pass and hands it to its TransformerBlock as megatron's `context` argument: a forward
argument, recomputed with the layers under activation recompute, never state kept between steps.

With `model` IO functions the stage also holds the frozen models (`self.frozen_models`, a plain
dict: not submodules, so not in the optimizer or the state dict); each runs once per micro-batch
here and its states are appended to the context (neon/flaming/frozen_model.py). Under tensor
parallelism every TP rank holds its own replica and runs it on the whole sequence (a state needs
the tokens before it); with sequence parallelism each rank's layers then get the context rows of
their part of the sequence, as megatron's embedding scatters the hidden states.

With `context`-query store functions in the global bank, the stage searches each store once per
micro-batch for all its tokens and appends the entry indices to the context, for every layer to
reuse (`context_searches`, a plain dict; neon/flaming/search_reuse.py).
"""

from __future__ import annotations

from megatron.core.models.gpt import GPTModel

from neon.flaming.frozen_model import append_frozen_states, build_frozen_models
from neon.flaming.io import token_context
from neon.flaming.search_reuse import append_searches, build_context_searches


class IOGPTModel(GPTModel):
    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self.frozen_models = build_frozen_models(config)  # {source: FrozenModel}, unregistered
        self.context_searches = build_context_searches(config)  # {name: ContextSearch}, unregistered

    def forward(self, input_ids, position_ids, attention_mask, decoder_input=None, labels=None,
                inference_context=None, packed_seq_params=None, extra_block_kwargs=None, *args,
                **kwargs):
        if input_ids is None:
            raise RuntimeError("a model with FlamingMoE IO functions needs the input ids on every "
                               "pipeline stage (they give the token context)")
        ctx = token_context(input_ids, self.config.flaming_io_context_window, position_ids)
        ctx = append_frozen_states(ctx, input_ids, self.config, self.frozen_models)
        ctx = append_searches(ctx, self.context_searches)  # [s, b, C + reused indices]
        if self.config.sequence_parallel:  # the layers hold this TP rank's part of the sequence
            ctx = ctx.chunk(self.pg_collection.tp.size(), dim=0)[self.pg_collection.tp.rank()]
        extra_block_kwargs = {**(extra_block_kwargs or {}), "context": ctx}
        return super().forward(input_ids, position_ids, attention_mask, decoder_input, labels,
                               inference_context, packed_seq_params, extra_block_kwargs, *args,
                               **kwargs)
