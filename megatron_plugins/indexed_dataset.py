"""megatron-core's IndexedDataset.__del__ deletes `bin_reader` and `index` unconditionally. When
its initialisation is interrupted (Ctrl-C or SIGTERM while a run opens its data), the half-built
object has neither, and its __del__ prints an "Exception ignored ... AttributeError" traceback
after the run's own message. `install()` makes it delete only what is there."""

from __future__ import annotations


def _tolerant_del(self) -> None:
    for name in ("bin_reader", "index"):
        self.__dict__.pop(name, None)


def install() -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    IndexedDataset.__del__ = _tolerant_del
