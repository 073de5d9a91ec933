"""Neon: a Megatron-style pretraining framework for the Neon architecture (README.md).

Importing any part of `neon` first installs `megatron_plugins.lazy_jit`, so that megatron-core's
fused functions compile at their first call rather than at `import megatron.core` (2 to 4 CPU-s
less per process: tools/benchmark_startup.py), and `megatron_plugins.lazy_wandb`, so that the
wandb that megatron-core imports is loaded only when a run logs to it (0.6 CPU-s less)."""

from megatron_plugins import lazy_jit, lazy_wandb

lazy_jit.install()
lazy_wandb.install()
