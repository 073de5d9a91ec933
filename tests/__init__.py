# Processes that import a test module first (pytest's workers, the ranks tests/dist.py spawns)
# defer megatron-core's import-time compilation as `import neon` does (megatron_plugins/lazy_jit.py).
from megatron_plugins import lazy_jit

lazy_jit.install()
