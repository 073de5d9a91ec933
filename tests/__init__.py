# Processes that import a test module first (pytest's workers, the forkserver of tests/dist.py)
# defer megatron-core's import-time compilation and its wandb import as `import neon` does
# (megatron_plugins/lazy_jit.py, lazy_wandb.py).
from megatron_plugins import lazy_jit, lazy_wandb

lazy_jit.install()
lazy_wandb.install()
