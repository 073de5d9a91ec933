"""Routers of a FlamingMoE bank: megatron-core's TopKRouter, and hard Gumbel-softmax on top of it.

Both score a token x' with a bias-free linear map, logits = W_r x' ([tokens, n]), and return
(probs [tokens, n], routing_map [tokens, n] bool) for megatron's token dispatchers.

- 'topk': megatron's top-k softmax: p = softmax(logits); the k largest are used, weighted by p.
- 'gumbel' (the prototype's selection, straight-through hard Gumbel-softmax):
      training:   y = softmax((logits + g) / tau), g ~ Gumbel(0, 1) i.i.d.
      evaluation: y = softmax(logits / tau)        (no noise: deterministic)
  the k largest entries of y are chosen, each with weight exactly 1 in the forward pass and the
  gradient of y in the backward pass (weight = 1 + y - stopgrad(y)).
  Only the chosen functions run, so the straight-through gradient reaches the router through
  the chosen entries; the prototype's dense version also passed f_i(x) of unchosen functions.

Losses (megatron's, attached to the routing weights so they join the backward pass):
Switch load balancing n * sum_i f_i P_i on the noise-free softmax, and the ST-MoE z-loss
mean(logsumexp(logits)^2). Both are logged in megatron's aux-loss tracker under
'flaming_<bank>_load_balancing_loss' and 'flaming_<bank>_z_loss', per layer.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.moe.moe_utils import (
    MoEAuxLossAutoScaler,
    save_to_aux_losses_tracker,
    z_loss_func,
)
from megatron.core.transformer.moe.router import TopKRouter


def gumbel_noise(shape, device=None, dtype=torch.float32) -> torch.Tensor:
    """g = -log(-log(u)), u ~ U(0, 1), from torch's default generator."""
    u = torch.rand(shape, device=device, dtype=dtype)
    tiny = torch.finfo(dtype).tiny
    e = (-torch.log(u.clamp_min(tiny))).clamp_min(tiny)  # Exp(1)
    return -torch.log(e)


class FlamingRouter(TopKRouter):
    """megatron's TopKRouter with a bank name on its logged losses and an optional Gumbel mode."""

    def __init__(self, config, pg_collection=None, *, bank: str, mode: str = "topk",
                 temperature: float = 1.0):
        super().__init__(config=config, pg_collection=pg_collection)
        self.bank = bank
        self.mode = mode
        self.temperature = temperature

    def _tracker_name(self, name: str) -> str:
        return f"flaming_{self.bank}_{name}"

    def attach_and_log_load_balancing_loss(self, activation, aux_loss_coeff, aux_loss, aux_loss_name,
                                           *args, **kwargs):
        return super().attach_and_log_load_balancing_loss(
            activation, aux_loss_coeff, aux_loss, self._tracker_name(aux_loss_name), *args, **kwargs)

    def apply_z_loss(self, logits, padding_mask: Optional[torch.Tensor] = None):
        """megatron's z-loss (TopKRouter.apply_z_loss) logged under this bank's name."""
        coeff = self.config.moe_z_loss_coeff
        if coeff is None or not (self.training and torch.is_grad_enabled()):
            return logits
        coeff = coeff / self.tp_cp_group.size()
        z_loss = z_loss_func(logits, coeff, padding_mask=padding_mask)
        scale = logits.shape[0] if self.calculate_per_token_loss else 1
        logits = MoEAuxLossAutoScaler.apply(logits, z_loss * scale)
        save_to_aux_losses_tracker(self._tracker_name("z_loss"), z_loss / coeff, self.layer_number,
                                   self.config.num_layers)
        return logits

    def routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        if self.mode == "topk":
            return super().routing(logits, padding_mask=padding_mask)
        assert padding_mask is None, "Gumbel routing does not take padding masks"
        n = self.config.num_moe_experts
        logits = self.apply_z_loss(logits.view(-1, n))  # [tokens, n]
        scores = logits
        if self.training:
            scores = logits + gumbel_noise(logits.shape, device=logits.device, dtype=logits.dtype)
        y_soft = torch.softmax(scores / self.temperature, dim=-1)
        top = torch.topk(scores, k=self.topk, dim=-1).indices
        routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter(1, top, True)
        # straight-through: exactly 1 forward, d(y_soft) backward, 0 off the chosen functions
        probs = torch.where(routing_map, (y_soft - y_soft.detach()) + 1.0, torch.zeros_like(y_soft))
        if self.training and torch.is_grad_enabled() and self.is_aux_loss_enabled():
            probs = self._apply_aux_loss(probs, torch.softmax(logits, dim=-1), routing_map)
        return probs, routing_map
