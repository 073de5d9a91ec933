"""A tiny Neon model's forward and backward pass on the CPU (placeholder main job until the
pretraining run lands): builds the model through megatron-core, runs one step, prints the loss."""

import torch

from megatron_plugins import distributed
from neon.config import NeonConfig
from neon.model import build_model


def main():
    distributed.initialize(seed=1234)
    cfg = NeonConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                     ffn_hidden_size=128, vocab_size=256, max_position_embeddings=64, sliding_window=32)
    model = build_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 33))
    positions = torch.arange(32).expand(2, 32)
    loss = model(tokens[:, :-1], positions, None, labels=tokens[:, 1:]).mean()
    loss.backward()
    grad_norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters() if p.grad is not None))
    print(f"Neon tiny model: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"loss {loss.item():.4f} (ln V = {torch.log(torch.tensor(256.0)).item():.4f}), "
          f"grad norm {grad_norm.item():.4f}")
    distributed.shutdown()


if __name__ == "__main__":
    main()
