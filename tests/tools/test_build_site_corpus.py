"""tools/build_site_corpus.py: one document per source file of the named installed packages, in a
fixed order, checked against the files found on disk; the manifest's counts and sha256 match the
written bytes; a package that is not installed is a clear error before anything is written."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import tqdm
import yaml

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "tools/build_site_corpus.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def files_on_disk(package_dir: Path, max_bytes: int) -> dict[str, str]:
    """{'pkg/sub/file.py': text} found by walking the package's folder (the reference)."""
    site = package_dir.parent
    return {p.relative_to(site).as_posix(): p.read_text(encoding="utf-8") for p in package_dir.rglob("*.py")
            if "__pycache__" not in p.parts and p.stat().st_size <= max_bytes}


def test_documents_are_the_packages_source_files_in_order_with_a_matching_manifest(tmp_path):
    out = tmp_path / "corpus.jsonl"
    tqdm_dir, yaml_dir = Path(tqdm.__file__).parent, Path(yaml.__file__).parent
    largest = max(p.stat().st_size for p in tqdm_dir.rglob("*.py"))
    limit = largest - 1  # leaves out tqdm's largest file (std.py)
    r = run_cli("--output", out, "--packages", "tqdm", "pyyaml", "--max-file-bytes", limit)
    assert r.returncode == 0, r.stderr
    assert "site-packages corpus" in r.stderr and "documents" in r.stdout  # tqdm bar and the summary

    docs = [json.loads(line)["text"] for line in out.read_text(encoding="utf-8").splitlines()]
    got = {}
    for d in docs:
        header, _, text = d.partition("\n\n")
        assert header.startswith("# ")
        got[header[2:]] = text
    expected_tqdm = files_on_disk(tqdm_dir, limit)
    expected_yaml = files_on_disk(yaml_dir, limit)
    assert "tqdm/std.py" not in got and "tqdm/std.py" not in expected_tqdm
    for rel, text in {**expected_tqdm, **expected_yaml}.items():
        assert got[rel] == text  # the file's exact text
    # pyyaml's RECORD also lists _yaml/__init__.py; nothing else is in the corpus
    assert set(got) - set(expected_tqdm) - set(expected_yaml) <= {"_yaml/__init__.py"}
    order = [d.partition("\n\n")[0][2:] for d in docs]
    n_tqdm = len(expected_tqdm)
    assert order[:n_tqdm] == sorted(expected_tqdm)  # packages as given, then by path
    assert set(order[n_tqdm:]) >= set(expected_yaml)

    manifest = json.loads(Path(str(out) + ".manifest.json").read_text())
    assert manifest["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert manifest["documents"] == len(docs) and manifest["bytes"] == out.stat().st_size
    assert manifest["packages"]["tqdm"]["files"] == n_tqdm
    assert manifest["packages"]["tqdm"]["version"] == tqdm.__version__
    assert manifest["packages"]["tqdm"]["skipped_too_large"] == 1  # std.py

    again = tmp_path / "again.jsonl"
    assert run_cli("--output", again, "--packages", "tqdm", "pyyaml", "--max-file-bytes", limit,
                   "--quiet").returncode == 0
    assert again.read_bytes() == out.read_bytes()  # the same install gives the same bytes


def test_a_package_that_is_not_installed_is_named_before_anything_is_written(tmp_path):
    out = tmp_path / "corpus.jsonl"
    r = run_cli("--output", out, "--packages", "tqdm", "no-such-package-neon")
    assert r.returncode == 2
    assert "'no-such-package-neon' is not installed" in r.stderr and "Fix:" in r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists()
