"""A FlamingMoE `store` IO function against the store's size and search index (neon/io/).

For each store size N (random unit keys [N, K] float32 and token values [N, M] int32, written in
the store layout of neon/io/store.py and memory-mapped) and each index type (exact, ivf_flat,
ivf_pq, hnsw; neon/io/index.py with its default parameters: nlist 4 sqrt(N), nprobe 16, PQ key_dim
/ 4 codes with 4x exact refine, HNSW M 32 / efSearch 64), printed per row:

    build s    the index's training and filling (0 for exact)
    search     the search parameter (nprobe for IVF, efSearch for HNSW)
    recall@k   of the index's top-k against the exact search, for Q queries near stored keys
               (a stored key plus noise of norm ~0.3: a trained query lands near the entry it
               wants; a blind query has no nearest key to find)
    s/step     the function's forward and backward on T routed tokens: learned query W_q x
               (`query=hidden`), the search, the softmax-weighted read of k values through its
               embedding, W_out (the function's part of a training step)
    vs 1e4     s/step over the exact search's s/step at the smallest N in the run
    RSS MB     the process's resident memory added by opening the store and searching (the
               index's memory-mapped pages that were touched, its heap)

    python tools/benchmark_flaming_io.py --entries 10000 100000 1000000 10000000 --tokens 256

`--reuse-layers L` times instead a global-bank `context`-query store function shared by L layers
(its search done once per micro-batch for every layer: neon/io/store.py ContextSearch), per
micro-batch of T tokens of which each layer routes a fraction f (`--routed-fraction`, k / n at
uniform routing) to it: without reuse, each layer's forward and backward on its f T tokens, each
with its own search; with reuse, one search for all T tokens, then the L layers' forward and
backward reading the indices from the context. Printed: seconds per micro-batch both ways and
their ratio.

    python tools/benchmark_flaming_io.py --entries 100000 --tokens 1024 --reuse-layers 8 --routed-fraction 0.25
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import psutil
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

INDEXES = ("exact", "ivf_flat", "ivf_pq", "hnsw")


def write_random_store(path: str, entries: int, key_dim: int, value_width: int, vocab: int, seed: int = 0) -> None:
    """A store of `entries` random unit keys and random token values (layout: neon/io/store.py)."""
    from neon.io.encoder import describe
    from neon.io.store import FORMAT, KEYS, META, VALUES, VERSION, content_hash

    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(seed)
    with open(os.path.join(path, KEYS), "wb") as fk, open(os.path.join(path, VALUES), "wb") as fv:
        for start in range(0, entries, 1 << 20):
            rows = min(1 << 20, entries - start)
            keys = rng.standard_normal((rows, key_dim), dtype=np.float32)
            keys /= np.linalg.norm(keys, axis=1, keepdims=True)
            fk.write(keys.tobytes())
            fv.write(rng.integers(0, vocab, (rows, value_width), dtype=np.int32).tobytes())
    meta = {"format": FORMAT, "version": VERSION, "entries": entries, "key_dim": key_dim, "values": "tokens",
            "value_width": value_width, "encoder": describe("random:1", 4, key_dim, vocab),
            "keys_bytes": entries * key_dim * 4, "values_bytes": entries * value_width * 4}
    meta["content_sha256"] = content_hash(path)
    with open(os.path.join(path, META), "w") as f:
        json.dump(meta, f)


def with_index(base: str, path: str, index: str, key_dim: int) -> float:
    """A store at `path` sharing `base`'s keys and values (hard links), with `index` built;
    returns the index's build seconds."""
    from neon.io.index import build_index, index_params
    from neon.io.store import KEYS, META, VALUES

    os.makedirs(path, exist_ok=True)
    for name in (KEYS, VALUES):
        os.link(os.path.join(base, name), os.path.join(path, name))
    with open(os.path.join(base, META)) as f:
        meta = json.load(f)
    t0 = time.perf_counter()
    if index != "exact":
        keys = np.memmap(os.path.join(path, KEYS), dtype=np.float32, mode="r", shape=(meta["entries"], key_dim))
        meta["index"] = build_index(path, keys, index_params(index, meta["entries"], key_dim))
    seconds = time.perf_counter() - t0
    with open(os.path.join(path, META), "w") as f:
        json.dump(meta, f)
    return seconds


def io_function(store: str, hidden: int, vocab: int, topk: int, search: str = ""):
    from neon.io.base import IOSettings, parse_spec
    from neon.io.store import StoreFunction

    spec = parse_spec(f"name=bench,kind=store,source={store},query=hidden,topk={topk}{search}")
    return StoreFunction(spec, IOSettings(hidden_size=hidden, vocab_size=vocab, context_window=4))


def time_steps(fn, tokens: int, hidden: int, window: int, repeats: int) -> float:
    x = torch.randn(tokens, hidden, requires_grad=True)
    context = torch.zeros(tokens, 2 + window, dtype=torch.long)
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up (page cache, allocator)
        t0 = time.perf_counter()
        fn(x, context).sum().backward()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def near_queries(keys: np.ndarray, n: int, noise: float = 0.3, seed: int = 1) -> torch.Tensor:
    """Stored keys plus Gaussian noise of norm ~`noise`, unit length."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(keys.shape[0], size=n, replace=False))
    q = np.array(keys[rows]) + rng.standard_normal((n, keys.shape[1]), dtype=np.float32) * noise / keys.shape[1] ** 0.5
    return torch.nn.functional.normalize(torch.from_numpy(q), dim=-1)


def recall(found: torch.Tensor, exact: torch.Tensor) -> float:
    k = exact.shape[1]
    return float(np.mean([len(set(f.tolist()) & set(e.tolist())) / k for f, e in zip(found, exact)]))


def main_indexes(args, work: str) -> None:
    from neon.io.index import exact_topk

    proc = psutil.Process()
    print(f"{'entries':>10} {'index':>9} {'build s':>8} {'search':>7} {'recall@' + str(args.topk):>9} {'tokens':>7} "
          f"{'s/step':>8} {'vs 1e4':>7} {'RSS MB':>7}")
    smallest = None
    for n in args.entries:
        base = os.path.join(work, f"store_{n}")
        write_random_store(base, n, args.key_dim, args.value_width, args.vocab)
        keys = np.memmap(os.path.join(base, "keys.f32"), dtype=np.float32, mode="r", shape=(n, args.key_dim))
        queries = near_queries(keys, args.queries)
        truth = exact_topk(queries, keys, args.topk)[1]
        for index in args.indexes:
            path = os.path.join(work, f"store_{n}_{index}")
            build = with_index(base, path, index, args.key_dim)
            key = {"exact": None, "hnsw": "ef_search"}.get(index, "nprobe")
            for value in ([0] if key is None else args.ef_search if index == "hnsw" else args.nprobe):
                gc.collect()
                rss = proc.memory_info().rss
                fn = io_function(path, args.hidden, args.vocab, args.topk, f",{key}={value}" if key else "")
                found = fn.store.search(queries, args.topk)
                for t in args.tokens:
                    s = time_steps(fn, t, args.hidden, window=4, repeats=args.repeats)
                    smallest = smallest or s
                    added = (proc.memory_info().rss - rss) / 2**20
                    print(f"{n:>10} {index:>9} {build:>8.1f} {value or '-':>7} {recall(found, truth):>9.3f} {t:>7} "
                          f"{s:>8.4f} {s / smallest:>7.2f} {added:>7.0f}", flush=True)
                del fn
        del keys


def reuse_function(store: str, hidden: int, vocab: int, topk: int, reuse: bool):
    """(the global-bank context-query store function, the model's config)."""
    from neon.config import NeonConfig
    from neon.flaming.io import build_io_function, io_specs

    config = NeonConfig(num_layers=1, hidden_size=hidden, num_attention_heads=4, vocab_size=vocab,
                        flaming_moe="between", flaming_layer_functions=1, flaming_topk=1,
                        flaming_io_reuse_search=reuse,
                        flaming_io_functions=[f"name=bench,kind=store,source={store},query=context,"
                                              f"topk={topk},bank=global"])
    return build_io_function(config, io_specs(config)[0]), config


def time_reuse(store: str, args, tokens: int, reuse: bool) -> float:
    """Seconds per micro-batch of `tokens` tokens for the L layers' reads of one shared function."""
    from neon.flaming.io import io_settings, io_specs, model_context
    from neon.io.base import context_providers

    fn, config = reuse_function(store, args.hidden, args.vocab, args.topk, reuse)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (1, tokens), generator=gen)
    routed = max(1, int(round(args.routed_fraction * tokens)))
    layers = [torch.randperm(tokens, generator=gen)[:routed] for _ in range(args.reuse_layers)]
    xs = [torch.randn(routed, args.hidden, requires_grad=True) for _ in layers]
    providers = context_providers(io_specs(config), io_settings(config))  # the model's: its search, if reused
    times = []
    for _ in range(args.repeats + 1):  # the first is a warm-up (page cache, allocator)
        t0 = time.perf_counter()
        context = model_context(config, ids, providers=providers).reshape(tokens, -1)
        for rows, x in zip(layers, xs):
            fn(x, context[rows]).sum().backward()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def main_reuse(args, work: str) -> None:
    print(f"# reuse of context-query searches: {args.reuse_layers} layers share the function, each "
          f"routes {args.routed_fraction:g} of the tokens to it")
    print(f"{'entries':>10} {'tokens':>7} {'no reuse s':>11} {'reuse s':>9} {'ratio':>6}")
    for n in args.entries:
        store = os.path.join(work, f"store_{n}")
        write_random_store(store, n, args.key_dim, args.value_width, args.vocab)
        for t in args.tokens:
            without, with_ = (time_reuse(store, args, t, reuse) for reuse in (False, True))
            print(f"{n:>10} {t:>7} {without:>11.4f} {with_:>9.4f} {without / with_:>6.2f}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--entries", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--indexes", nargs="+", choices=INDEXES, default=list(INDEXES))
    p.add_argument("--nprobe", type=int, nargs="+", default=[16, 64], help="IVF cells scanned per query")
    p.add_argument("--ef-search", type=int, nargs="+", default=[64, 256], help="HNSW candidates per query")
    p.add_argument("--tokens", type=int, nargs="+", default=[256], help="routed tokens per step")
    p.add_argument("--queries", type=int, default=256, help="queries of the recall measurement")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--key-dim", type=int, default=64)
    p.add_argument("--value-width", type=int, default=4)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--work-dir", default=None, help="where the stores are written (default: a temp dir)")
    p.add_argument("--reuse-layers", type=int, default=0,
                   help="time the reuse of a global context-query search over this many layers instead")
    p.add_argument("--routed-fraction", type=float, default=0.25,
                   help="with --reuse-layers: the tokens each layer routes to the function")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; hidden {args.hidden}, key_dim {args.key_dim}, "
          f"topk {args.topk}, value_width {args.value_width}")
    with tempfile.TemporaryDirectory(dir=args.work_dir) as work:
        if args.reuse_layers:
            main_reuse(args, work)
        else:
            main_indexes(args, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
