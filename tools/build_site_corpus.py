#!/usr/bin/env python
r"""Build a corpus from the Python source of installed packages (no download), as JSONL.

    python tools/build_site_corpus.py --output runs/site/site_corpus.jsonl
    python tools/train_tokenizer.py --input runs/site/site_corpus.jsonl --output-prefix runs/site/tokenizer_4096 \
        --vocab-size 4096
    python tools/preprocess_data.py --input runs/site/site_corpus.jsonl \
        --tokenizer-model runs/site/tokenizer_4096.model --output-prefix runs/site/site_4096 --append-eod --workers 2

One document per .py file of each package (tests and files over --max-file-bytes left out);
the default packages are pinned in requirements.txt, so the same install gives the same bytes.
Writes OUTPUT and OUTPUT.manifest.json (versions, files, bytes, sha256). See neon/data/site_corpus.py.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

from neon.data.site_corpus import DEFAULT_PACKAGES, MAX_FILE_BYTES, build_site_corpus  # noqa: E402
from neon.errors import NeonError  # noqa: E402


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="the JSONL file to write ({\"text\": ...} per line)")
    p.add_argument("--packages", nargs="+", default=list(DEFAULT_PACKAGES),
                   help=f"installed distributions, in this order (default: {' '.join(DEFAULT_PACKAGES)})")
    p.add_argument("--max-file-bytes", type=int, default=MAX_FILE_BYTES,
                   help=f"leave out larger files (default: {MAX_FILE_BYTES})")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = get_args(argv)
    try:
        manifest = build_site_corpus(args.output, args.packages, args.max_file_bytes, show_progress=not args.quiet)
    except NeonError as err:
        print(f"build_site_corpus.py: error: {err}", file=sys.stderr)
        return err.exit_status
    if args.quiet:
        return 0
    for name, s in manifest["packages"].items():
        differs = s["pinned"] and s["pinned"] != s["version"]
        note = f" (requirements.txt pins {s['pinned']}: the corpus differs from the pinned one)" if differs else ""
        print(f"  {name} {s['version']}: {s['files']} files, {s['bytes'] / 1e6:.2f} MB{note}")
    print(f"wrote {args.output}: {manifest['documents']} documents, {manifest['bytes'] / 1e6:.1f} MB, "
          f"sha256 {manifest['sha256'][:16]}...; manifest {args.output}.manifest.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
