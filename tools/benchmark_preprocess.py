#!/usr/bin/env python
"""Throughput of tools/preprocess_data.py: documents/s and MB/s for several worker counts in the
same run, with the ratio to the first (the baseline, 1 worker by default).

    python tools/benchmark_preprocess.py                 # demo corpus x4, workers 1 and 2
    python tools/benchmark_preprocess.py --input my.jsonl --tokenizer-model tok.model --workers 1 2 4 8

Without --input it builds the demo corpus (neon.data.corpus) and repeats it --repeat-corpus
times; without --tokenizer-model it trains a BPE model of --vocab-size on it (not timed).
Each setting runs --runs times (best run reported); outputs of all settings must be identical.
A last row, "sp only", is the ceiling: sentencepiece encoding the same documents in this process
(JSON parsing included; no worker processes, no writing).
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))
warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).*not installed")  # megatron-core's import

from neon.data.corpus import build_demo_corpus  # noqa: E402
from neon.data.preprocess import preprocess  # noqa: E402
from neon.data.tokenizer import NeonTokenizer  # noqa: E402
from neon.data.tokenizer_training import train_tokenizer  # noqa: E402


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--input", nargs="+", default=None, help="text/JSONL files; default: the demo corpus")
    p.add_argument("--json-keys", nargs="+", default=["text"])
    p.add_argument("--tokenizer-model", default=None, help="default: train one on the input")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--repeat-corpus", type=int, default=4, help="demo corpus copies (a bigger input)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="first = baseline")
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--chunk-size", type=int, default=32)
    p.add_argument("--work-dir", default=None, help="default: a temporary folder")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = get_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        inputs = args.input
        if inputs is None:
            corpus = build_demo_corpus(work, show_progress=False).read_bytes()
            big = work / "bench_corpus.jsonl"
            big.write_bytes(corpus * args.repeat_corpus)
            inputs = [str(big)]
        model = args.tokenizer_model or train_tokenizer(inputs, work / "bench_tok", vocab_size=args.vocab_size,
                                                        json_key=args.json_keys[0], show_progress=False)
        size = sum(os.path.getsize(f) for f in inputs)
        print(f"input: {', '.join(inputs)} ({size / 1e6:.1f} MB); tokenizer: {model}")
        print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, python "
              f"{platform.python_version()}, load average {os.getloadavg()[0]:.1f} at start; "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
        rows, outputs = [], {}
        for workers in args.workers:
            best = None
            for run in range(args.runs):
                prefix = work / f"bench_w{workers}_r{run}"
                res = preprocess(inputs, prefix, model, json_keys=args.json_keys, workers=workers,
                                 append_eod=True, chunk_size=args.chunk_size, show_progress=False)
                if best is None or res.seconds < best.seconds:
                    best = res
                out = res.prefixes[args.json_keys[0]]
                outputs[workers] = (Path(out + ".bin").read_bytes(), Path(out + ".idx").read_bytes())
            rows.append((workers, best))
        base = rows[0][1]
        print(f"\n{'workers':>7} {'docs':>8} {'tokens':>11} {'seconds':>8} {'docs/s':>9} {'MB/s':>7} {'x base':>7}")
        for workers, r in rows:
            print(f"{workers:>7} {r.num_documents:>8} {sum(r.num_tokens.values()):>11} {r.seconds:>8.2f} "
                  f"{r.docs_per_second:>9.0f} {r.mb_per_second:>7.2f} {r.mb_per_second / base.mb_per_second:>7.2f}")
        tok, key = NeonTokenizer(model), args.json_keys[0]
        best_raw = None
        for _ in range(args.runs):
            t0, ndocs, ntok, nbytes = time.perf_counter(), 0, 0, 0
            for f in inputs:
                with open(f, "rb") as fh:
                    for line in fh:
                        if line.strip():
                            ntok += len(tok.encode(json.loads(line)[key]))
                            ndocs, nbytes = ndocs + 1, nbytes + len(line)
            raw_s = time.perf_counter() - t0
            best_raw = raw_s if best_raw is None else min(best_raw, raw_s)
        raw_mbs = nbytes / 1e6 / best_raw
        print(f"{'sp only':>7} {ndocs:>8} {ntok:>11} {best_raw:>8.2f} {ndocs / best_raw:>9.0f} {raw_mbs:>7.2f} "
              f"{raw_mbs / base.mb_per_second:>7.2f}")
        same = len({v for v in outputs.values()}) == 1
        print(f"\noutputs identical across worker counts: {'yes' if same else 'NO'}; "
              f"load average {os.getloadavg()[0]:.1f} at end")
        return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
