"""megatron-core log lines that say nothing about a correct Neon model.

TransformerLayer logs "Unknown MLP type: <class 'ModuleSpec'>. Using default kwargs." for every
layer whose MLP spec is not one of megatron's own MLP classes (nGPT's MLP, FlamingMoE in the MLP's
place): the default kwargs are what those modules take, so the line is dropped.
"""

from __future__ import annotations

import logging

_MLP_KWARGS = "Unknown MLP type:"


def _keep(record: logging.LogRecord) -> bool:
    return _MLP_KWARGS not in record.getMessage()


def quiet_layer_logs() -> None:
    """Drop the lines above from megatron's transformer_layer logger (idempotent)."""
    logger = logging.getLogger("megatron.core.transformer.transformer_layer")
    if _keep not in logger.filters:
        logger.addFilter(_keep)
