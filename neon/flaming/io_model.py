"""GPTModel that builds the token context of FlamingMoE IO functions from its input ids.

Every pipeline stage receives the input ids (Neon's forward_step passes the batch to each stage),
so each stage builds the same context [s, b, C] (neon/io/base.py: the ids window, then the
columns of the IO kinds' context providers; with document masks, `attention_mask` is the document
ids, and no context column reaches an earlier document) in its own forward pass and hands it to its
TransformerBlock as megatron's `context` argument: a forward argument, recomputed with the layers
under activation recompute, never state kept between steps.

The providers (`io_providers`, a plain list: not submodules, so not in the optimizer or the state
dict) run once per micro-batch here: a frozen model (neon/io/frozen_model.py) on the whole
sequence, a global-bank `context`-query store searched once for every layer (neon/io/store.py).
Under tensor parallelism every TP rank runs them on the whole sequence (a frozen state needs the
tokens before it); with sequence parallelism each rank's layers then get the context rows of
their part of the sequence, as megatron's embedding scatters the hidden states. Under context
parallelism each rank gathers the whole sequences' ids from its CP group, builds the context of
the whole sequences (a token's ids window reaches into chunks other ranks hold; a frozen model
reads everything before it) and keeps the rows of its own two chunks.
"""

from __future__ import annotations

from megatron.core.models.gpt import GPTModel

from neon.context_parallel import gather_sequence, local_chunks
from neon.flaming.io import io_settings, io_specs
from neon.io.base import ContextLayout, build_context, context_providers


class IOGPTModel(GPTModel):
    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        specs, settings = io_specs(config), io_settings(config)
        self.io_layout = ContextLayout(specs, settings)
        self.io_providers = context_providers(specs, settings)

    def forward(self, input_ids, position_ids, attention_mask, decoder_input=None, labels=None,
                inference_context=None, packed_seq_params=None, extra_block_kwargs=None, *args,
                **kwargs):
        if input_ids is None:
            raise RuntimeError("a model with FlamingMoE IO functions needs the input ids on every "
                               "pipeline stage (they give the token context)")
        cp = self.pg_collection.cp
        ids, positions = input_ids, position_ids
        if cp.size() > 1:  # this rank holds two chunks of each sequence: build on the whole one
            ids = gather_sequence(input_ids, cp)
            positions = None if position_ids is None else gather_sequence(position_ids, cp)
        ctx = build_context(self.io_layout, self.io_providers, ids, positions,
                            dtype=self.config.params_dtype, documents=attention_mask)  # [b, S, C]
        if cp.size() > 1:
            ctx = local_chunks(ctx, cp, dim=1)
        ctx = ctx.transpose(0, 1).contiguous()  # megatron's [s, b, C]
        if self.config.sequence_parallel:  # the layers hold this TP rank's part of the sequence
            ctx = ctx.chunk(self.pg_collection.tp.size(), dim=0)[self.pg_collection.tp.rank()]
        extra_block_kwargs = {**(extra_block_kwargs or {}), "context": ctx}
        return super().forward(input_ids, position_ids, attention_mask, decoder_input, labels,
                               inference_context, packed_seq_params, extra_block_kwargs, *args,
                               **kwargs)
