"""wandb imported at its first use instead of at `import megatron.core`.

megatron-core imports wandb at import time (`megatron/core/timers.py`,
`megatron/core/inference/contexts/dynamic_context.py`, inside `try: import wandb`) whether or not
a run logs to it: about 0.5 CPU-seconds (wandb, pydantic, protobuf) in every process, each
torchrun rank and each tool. `install()` puts a stand-in module in `sys.modules["wandb"]`:
`import wandb` returns it at once, and its first attribute that a module does not have by
itself (`wandb.init`, ...) runs the real import and is read from the real module, as is every
one after it. The stand-in carries `__file__` and `__spec__`, which `inspect.getmodule` reads
from every loaded module (torch does at import), so those do not load wandb. (The standard
library's `importlib.util.LazyLoader` loads on any attribute, `__file__` included.) Where wandb
is not installed it does nothing, so megatron's `except ImportError` still applies. Must run
before anything imports wandb; afterwards it does nothing. `neon/__init__.py` calls it.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

MODULE = "wandb"


class _Deferred(types.ModuleType):
    """Stands for wandb until an attribute of the real module is asked for."""

    def __getattr__(self, name: str):
        if sys.modules.get(MODULE) is self:
            del sys.modules[MODULE]
        return getattr(importlib.import_module(MODULE), name)


def install() -> None:
    """Defer `import wandb` (idempotent; a no-op once wandb was imported or where it is missing)."""
    if MODULE in sys.modules:
        return
    spec = importlib.util.find_spec(MODULE)
    if spec is None:
        return
    stand_in = _Deferred(MODULE)
    stand_in.__file__, stand_in.__spec__, stand_in.__loader__ = spec.origin, spec, spec.loader
    sys.modules[MODULE] = stand_in
