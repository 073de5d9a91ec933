"""megatron_plugins/indexed_dataset.py: an IndexedDataset whose initialisation was interrupted
(it has bin_reader but no index yet) is collected without an "Exception ignored" traceback; a
whole one still drops its reader and index."""

import sys

import numpy as np
import torch


def collect_half_built(cls) -> list:
    """The unraisable exceptions of collecting an instance that has only `bin_reader`."""
    seen = []
    hook, sys.unraisablehook = sys.unraisablehook, seen.append
    try:
        half = cls.__new__(cls)
        half.bin_reader = object()
        del half
    finally:
        sys.unraisablehook = hook
    return seen


def test_a_half_built_dataset_is_collected_quietly(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    import neon.data.datasets  # noqa: F401  (installs the patch, as every run does)

    assert collect_half_built(IndexedDataset) == []

    class Unpatched(IndexedDataset):  # megatron's own __del__, for contrast: the test can fail
        def __del__(self):
            del self.bin_reader
            del self.index

    assert [type(u.exc_value) for u in collect_half_built(Unpatched)] == [AttributeError]

    builder = IndexedDatasetBuilder(str(tmp_path / "d.bin"), dtype=np.uint16)
    builder.add_document(torch.tensor([1, 2, 3]), [3])
    builder.finalize(str(tmp_path / "d.idx"))
    whole = IndexedDataset(str(tmp_path / "d"))
    assert whole[0].tolist() == [1, 2, 3]
    whole.__del__()
    assert not hasattr(whole, "index") and not hasattr(whole, "bin_reader")
