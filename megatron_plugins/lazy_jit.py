"""megatron-core's fused functions compiled on their first call instead of at import.

`megatron.core.jit.jit_fuser` is `torch.compile` (torch >= 2.2), applied as a decorator to the
fused bias-activation functions when `megatron.core` is imported. Decorating is what costs:
`torch.compile(fn)` imports TorchDynamo and Inductor, 2 to 4 CPU-seconds of `import
megatron.core` (tools/benchmark_startup.py, docs/benchmarks.md), in every process (each
torchrun rank, each tool), whether or not a fused function ever runs (the CPU runtime and
Neon's default specs never call them).

`install()` adds an import hook that, right after `megatron.core.jit` has run, wraps its
`jit_fuser` so that decorating only records the function; the first call applies the real
decorator (`torch.compile`, or whatever `jit_fuser` was) and every call after that goes straight
to the compiled function. `torch.compile` compiles on the first call anyway, so what runs, and
when it compiles, is unchanged. Must run before anything imports `megatron.core`; afterwards it
does nothing (the decorations have happened). `neon/__init__.py` calls it.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import sys

JIT_MODULE = "megatron.core.jit"


def deferred(decorator):
    """`decorator`, applied to a function at the function's first call rather than at decoration."""

    def decorate(fn):
        applied = None

        @functools.wraps(fn)
        def call(*args, **kwargs):
            nonlocal applied
            if applied is None:
                applied = decorator(fn)
            return applied(*args, **kwargs)

        return call

    return decorate


class _WrapJitFuser(importlib.abc.MetaPathFinder):
    """Finds `megatron.core.jit` as usual, and wraps its `jit_fuser` once the module has run."""

    def find_spec(self, name, path, target=None):
        if name != JIT_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is None or spec.loader is None:
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            module.jit_fuser = deferred(module.jit_fuser)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Defer megatron-core's import-time compilation (idempotent; a no-op once it was imported)."""
    if JIT_MODULE in sys.modules or any(isinstance(f, _WrapJitFuser) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _WrapJitFuser())
