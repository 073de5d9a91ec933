"""The demo corpus: text every Python install has, so `make demo` needs no download.

Documents, in a fixed order:
- every topic of `pydoc_data.topics` (the language reference pages `help()` shows, ~465 KB);
- the docstrings of the standard library, read with `ast` (nothing is imported): one document
  per module docstring and one per top-level class or function (its signature, its docstring and
  those of its methods). Test suites, idlelib, site-packages and private modules are left out.

The same Python version gives the same bytes. `prepare_demo_data` then trains the tokenizer and
writes the .bin/.idx, skipping each step whose output already exists.
"""

from __future__ import annotations

import ast
import json
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__",
             "ensurepip", "pydoc_data"}
CORPUS_NAME = "demo_corpus.jsonl"


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).parts
        if any(p in SKIP_DIRS or p.startswith(("_", "plat-")) for p in parts[:-1]):
            continue
        if parts[-1].startswith("_") and parts[-1] != "__init__.py":
            continue
        files.append(path)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _module_name(path: Path) -> str:
    rel = path.relative_to(Path(sysconfig.get_paths()["stdlib"])).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    prefix = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
    return f"{prefix} {node.name}({ast.unparse(node.args)}):"


def _docs_of_module(path: Path) -> Iterator[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    module = _module_name(path)
    doc = ast.get_docstring(tree)
    if doc:
        yield f"Module {module}\n\n{doc}"
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
            doc = ast.get_docstring(node)
            if doc:
                yield f"{module}.{node.name}\n\n{_signature(node)}\n{doc}"
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            lines = [f"{module}.{node.name}", "", f"class {node.name}:"]
            doc = ast.get_docstring(node)
            if doc:
                lines.append(doc)
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and (
                        not item.name.startswith("_") or item.name == "__init__"):
                    idoc = ast.get_docstring(item)
                    if idoc:
                        lines += ["", f"    {_signature(item)}", "\n".join("        " + ln if ln else ln
                                                                          for ln in idoc.splitlines())]
            if len(lines) > 3:
                yield "\n".join(lines)


def demo_documents(show_progress: bool = False) -> Iterator[str]:
    """Every document of the demo corpus, in order."""
    from pydoc_data import topics

    for name in sorted(topics.topics):
        text = topics.topics[name].strip()
        if text:
            yield text
    for path in tqdm(_stdlib_files(), desc="demo corpus: stdlib docstrings", unit=" modules",
                     disable=not show_progress, mininterval=0.5):
        yield from _docs_of_module(path)


def build_demo_corpus(out_dir: str | Path, show_progress: bool = True) -> Path:
    """Write `out_dir`/demo_corpus.jsonl ({"text": ...} per line, a few MB) and return its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / CORPUS_NAME
    tmp = path.with_suffix(".jsonl.tmp")
    n = size = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for doc in demo_documents(show_progress):
            line = json.dumps({"text": doc}, ensure_ascii=False) + "\n"
            f.write(line)
            n += 1
            size += len(line.encode("utf-8"))
    os.replace(tmp, path)
    if show_progress:
        print(f"wrote {path}: {n} documents, {size / 1e6:.1f} MB", flush=True)
    return path


def demo_data_paths(work_dir: str | Path, vocab_size: int) -> tuple[Path, str]:
    """(tokenizer model path, data prefix) that prepare_demo_data writes, before it runs."""
    from neon.data.preprocess import output_prefix_for

    work_dir = Path(work_dir)
    return work_dir / f"tokenizer_{vocab_size}.model", output_prefix_for(work_dir / f"demo_{vocab_size}", "text")


def prepare_demo_data(work_dir: str | Path, vocab_size: int, workers: int | None = None,
                      show_progress: bool = True) -> tuple[Path, str]:
    """Corpus -> tokenizer -> .bin/.idx under `work_dir`; returns (tokenizer_model_path, data_prefix).

    A step whose output exists is skipped (delete `work_dir` to start over); the tokenizer's file
    name carries the vocab size, so another vocab size trains and preprocesses anew.
    """
    from neon.data.checks import check_data_file
    from neon.data.preprocess import preprocess
    from neon.data.tokenizer_training import train_tokenizer

    work_dir = Path(work_dir)
    corpus = work_dir / CORPUS_NAME
    if not corpus.is_file():
        build_demo_corpus(work_dir, show_progress=show_progress)
    model, data_prefix = demo_data_paths(work_dir, vocab_size)
    if not model.is_file():
        train_tokenizer([str(corpus)], model.with_suffix(""), vocab_size=vocab_size, show_progress=show_progress)
    out = work_dir / f"demo_{vocab_size}"
    if not (os.path.isfile(data_prefix + ".idx") and os.path.isfile(data_prefix + ".bin")):
        preprocess([str(corpus)], out, model, json_keys=("text",), append_eod=True,
                   workers=workers or min(4, os.cpu_count() or 1), show_progress=show_progress)
    check_data_file(data_prefix, vocab_size)
    return model, data_prefix
