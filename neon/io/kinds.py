"""The built-in IO kinds, one line each: importing this module registers them
(`neon.io.base.register` adds a kind defined elsewhere). The contract is neon/io/base.py."""

from neon.io.base import KINDS, register
from neon.io.callables import CallableKind
from neon.io.frozen_model import ModelKind
from neon.io.store import StoreKind

for _kind in (StoreKind(), CallableKind(), ModelKind()):
    register(_kind)

__all__ = ["KINDS"]
