# Processes that import a test module first (pytest's workers, the forkserver of tests/dist.py)
# defer megatron-core's import-time compilation as `import neon` does (megatron_plugins/lazy_jit.py).
from megatron_plugins import lazy_jit

lazy_jit.install()
