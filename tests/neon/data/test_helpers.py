"""megatron-core's C++ dataset helpers: built from the helpers.cpp megatron-core ships when the
compiled extension is missing, and the build computes what the shipped extension computes."""

import importlib.util

import numpy as np
import pytest

from neon.data import DataError
from neon.data.helpers import compile_helpers, ensure_helpers, load_extension


def test_shipped_helpers_load():
    helpers = ensure_helpers()
    assert hasattr(helpers, "build_sample_idx") and hasattr(helpers, "build_blending_indices")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("pybind11") is None, reason="pybind11 not installed")
def test_compiled_helpers_match_the_shipped_ones(tmp_path):
    shipped = ensure_helpers()
    built = load_extension(compile_helpers(tmp_path), name="neon_test_build.helpers_cpp")
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 50, size=40).astype(np.int32)
    doc_index = np.concatenate([rng.permutation(40) for _ in range(2)]).astype(np.int32)
    args = (sizes, doc_index, 16, 2, int(sizes.sum()), True, 1)
    assert np.array_equal(built.build_sample_idx_int32(*args), shipped.build_sample_idx_int32(*args))
    out = [(np.zeros(100, np.int16), np.zeros(100, np.int64)) for _ in range(2)]
    built.build_blending_indices(*out[0], [0.3, 0.7], 2, 100, False)
    shipped.build_blending_indices(*out[1], [0.3, 0.7], 2, 100, False)
    assert all(np.array_equal(a, b) for a, b in zip(out[0], out[1]))


@pytest.mark.skipif(importlib.util.find_spec("pybind11") is not None, reason="pybind11 is installed")
def test_missing_pybind11_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="pip install pybind11"):
        compile_helpers(tmp_path)
