"""A larger corpus that needs no download: the Python source of installed packages.

One document per `.py` file of each named distribution (the files its installed RECORD lists),
in a fixed order: distributions as given, then each one's files by path. A document is the
file's path (`# megatron/core/utils.py`), a blank line and the file's text, docstrings and
comments included. Left out: files under a `test`/`tests`/`testing` folder, `__pycache__`, files
larger than `max_file_bytes` (with the default packages and limit: numpy/ma/core.py and
matplotlib/axes/_axes.py) and files that are not UTF-8.

The same distribution versions give the same bytes; requirements.txt pins the default ones, and
`build_site_corpus` writes a manifest with each version, its file count and size, and the
corpus's sha256, and reports a version that differs from its pin.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as metadata
import json
import os
import re
import sys
from pathlib import Path

from tqdm import tqdm

from neon.data.errors import DataError

# The pinned requirements (requirements.txt) with Python source, without torch and transformers
# (together ~100 MB more: add them with --packages) and the linters that carry binaries.
DEFAULT_PACKAGES = ("megatron-core", "numpy", "matplotlib", "wandb", "tensorboard", "pytest", "tqdm", "pyyaml",
                    "psutil", "safetensors", "sentencepiece")
SKIP_DIRS = {"test", "tests", "testing", "__pycache__"}
MAX_FILE_BYTES = 256_000
REQUIREMENTS = Path(__file__).resolve().parents[2] / "requirements.txt"


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned_versions(requirements: Path = REQUIREMENTS) -> dict[str, str]:
    """{normalised name: version} of the `name==version` lines of requirements.txt."""
    if not requirements.is_file():
        return {}
    pins = {}
    for line in requirements.read_text().splitlines():
        m = re.match(r"\s*([A-Za-z0-9_.-]+)\s*==\s*([^\s#;]+)", line)
        if m:
            pins[_normal(m.group(1))] = m.group(2)
    return pins


def _distribution(name: str) -> metadata.Distribution:
    try:
        return metadata.distribution(name)
    except metadata.PackageNotFoundError:
        raise DataError(f"package {name!r} is not installed in this Python ({sys.executable}), so its source "
                        f"cannot go into the corpus. Fix: install it (pip install -r requirements.txt) or leave it "
                        f"out of --packages.") from None


def source_files(dist: metadata.Distribution, max_file_bytes: int = MAX_FILE_BYTES
                 ) -> tuple[list[tuple[str, Path]], int]:
    """(path as listed, file on disk) of the distribution's `.py` files that go into the corpus, by
    path; and how many were left out for their size."""
    chosen, large = [], 0
    for f in dist.files or []:
        rel = f.as_posix()
        parts = rel.split("/")
        if not rel.endswith(".py") or any(p in SKIP_DIRS or p.endswith(".dist-info") for p in parts[:-1]):
            continue
        path = Path(dist.locate_file(f))
        if not path.is_file():
            continue
        if path.stat().st_size > max_file_bytes:
            large += 1
        else:
            chosen.append((rel, path))
    return sorted(chosen), large


def build_site_corpus(out: str | Path, packages=DEFAULT_PACKAGES, max_file_bytes: int = MAX_FILE_BYTES,
                      show_progress: bool = True) -> dict:
    """Write `out` ({"text": ...} per line) and `out`.manifest.json; returns the manifest."""
    out = Path(out)
    dists = [(name, _distribution(name)) for name in packages]  # every name checked before any work
    listed = {name: source_files(dist, max_file_bytes) for name, dist in dists}
    files = [(name, rel, path) for name, _ in dists for rel, path in listed[name][0]]
    pins = pinned_versions()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    digest = hashlib.sha256()
    stats = {name: {"version": dist.version, "pinned": pins.get(_normal(name)), "files": 0, "bytes": 0,
                    "skipped_too_large": listed[name][1], "skipped_not_utf8": 0} for name, dist in dists}
    with open(tmp, "w", encoding="utf-8") as f:
        for name, rel, path in tqdm(files, desc="site-packages corpus", unit=" files", disable=not show_progress,
                                       mininterval=0.5):
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                stats[name]["skipped_not_utf8"] += 1
                continue
            line = json.dumps({"text": f"# {rel}\n\n{text}"}, ensure_ascii=False) + "\n"
            f.write(line)
            digest.update(line.encode("utf-8"))
            stats[name]["files"] += 1
            stats[name]["bytes"] += len(line.encode("utf-8"))
    os.replace(tmp, out)
    manifest = {"corpus": str(out), "documents": sum(s["files"] for s in stats.values()),
                "bytes": sum(s["bytes"] for s in stats.values()), "sha256": digest.hexdigest(),
                "max_file_bytes": max_file_bytes, "packages": stats}
    Path(str(out) + ".manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest
