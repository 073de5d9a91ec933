"""megatron-core's compiled dataset helpers (helpers_cpp), built from its own helpers.cpp if missing.

GPTDataset's sample index (`build_sample_idx`) and BlendedDataset's blending indices
(`build_blending_indices`) run only in the C++ extension `megatron.core.datasets.helpers_cpp`;
megatron-core 0.16.1 has no pure-Python fallback. Its binary wheels ship the extension already
built; a source install may not, and `megatron.core.datasets.utils.compile_helpers()` calls a
Makefile the package does not ship. `ensure_helpers()` then compiles the helpers.cpp that does
ship, with g++ and pybind11 (`pip install pybind11`), into a cache folder and registers it as
`megatron.core.datasets.helpers_cpp`.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

from neon.data.errors import DataError

MODULE = "megatron.core.datasets.helpers_cpp"


def _cache_dir() -> Path:
    root = os.environ.get("NEON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "neon")
    return Path(root) / "megatron_helpers" / f"py{sys.version_info[0]}{sys.version_info[1]}"


def compile_helpers(out_dir: Path | None = None, timeout: float = 600) -> Path:
    """Compile megatron-core's datasets/helpers.cpp into `out_dir` and return the extension's path."""
    import megatron.core.datasets as mcd

    source = Path(mcd.__file__).parent / "helpers.cpp"
    if not source.is_file():
        raise DataError(f"megatron-core's {source} is missing, so its dataset helpers cannot be built; reinstall "
                        f"megatron-core==0.16.1 from a binary wheel.")
    try:
        import pybind11
    except ImportError as err:
        raise DataError("megatron-core's compiled dataset helpers are missing and building them needs pybind11: "
                        "`pip install pybind11` (and g++), or install megatron-core from a binary wheel.") from err
    out_dir = Path(out_dir or _cache_dir())
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"helpers_cpp{sysconfig.get_config_var('EXT_SUFFIX')}"
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    cmd = [os.environ.get("CXX", "g++"), "-O3", "-Wall", "-shared", "-std=c++17", "-fPIC",
           f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}", str(source), "-o", str(tmp)]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as err:
        raise DataError(f"building megatron-core's dataset helpers needs a C++ compiler ({cmd[0]} not found); "
                        f"install g++ or set CXX.") from err
    except subprocess.CalledProcessError as err:
        raise DataError(f"building megatron-core's dataset helpers failed:\n{' '.join(cmd)}\n"
                        f"{err.stderr[-4000:]}") from err
    os.replace(tmp, target)
    return target


def load_extension(path: Path, name: str = MODULE):
    """Import the compiled helpers at `path` as module `name` (registered in sys.modules)."""
    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
    spec = importlib.util.spec_from_file_location(name, str(path), loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    sys.modules[name] = module
    return module


def ensure_helpers():
    """Return megatron-core's helpers module, compiling its C++ part first when it is not installed."""
    try:
        from megatron.core.datasets import helpers
        return helpers
    except ImportError:
        pass
    cached = _cache_dir() / f"helpers_cpp{sysconfig.get_config_var('EXT_SUFFIX')}"
    load_extension(cached if cached.is_file() else compile_helpers())
    from megatron.core.datasets import helpers
    return helpers
