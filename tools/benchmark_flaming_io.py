"""Step time of a FlamingMoE `store` IO function against the store's size and the routed tokens.

For each store size N (random unit keys [N, K] float32 and token values [N, M] int32, written in
the store layout of neon/flaming/store.py and memory-mapped) and each routed-token count T, one
step is the IO function's forward and backward on T tokens: the learned query W_q x
(`query=hidden`), one exact blocked top-k search over all N keys for the T tokens at once, the
softmax-weighted read of the k values through the function's embedding, W_out, and the backward
through W_out, the embedding and W_q. It is the function's part of a training step (the rest of
the model is the same with or without it). Printed: median seconds per step, and keys scanned
per second.

    python tools/benchmark_flaming_io.py --entries 10000 100000 1000000 --tokens 256 1024

`--reuse-layers L` times instead a global-bank `context`-query store function shared by L layers
(neon/flaming/search_reuse.py), per micro-batch of T tokens of which each layer routes a
fraction f (`--routed-fraction`, k / n at uniform routing) to it: without reuse, each layer's
forward and backward on its f T tokens, each with its own search; with reuse, one search for
all T tokens, then the L layers' forward and backward reading the indices from the context.
Printed: seconds per micro-batch both ways and their ratio.

    python tools/benchmark_flaming_io.py --entries 100000 --tokens 1024 --reuse-layers 8 --routed-fraction 0.25
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write_random_store(path: str, entries: int, key_dim: int, value_width: int, vocab: int, seed: int = 0) -> None:
    """A store of `entries` random unit keys and random token values (layout: neon/flaming/store.py)."""
    from neon.flaming.encoder import describe
    from neon.flaming.store import FORMAT, KEYS, META, VALUES, VERSION, content_hash

    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(seed)
    with open(os.path.join(path, KEYS), "wb") as fk, open(os.path.join(path, VALUES), "wb") as fv:
        for start in range(0, entries, 65536):
            rows = min(65536, entries - start)
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


def io_function(store: str, hidden: int, vocab: int, topk: int):
    from neon.config import NeonConfig
    from neon.flaming.io import parse_spec
    from neon.flaming.store import StoreFunction

    config = NeonConfig(num_layers=1, hidden_size=hidden, num_attention_heads=4, vocab_size=vocab)
    spec = parse_spec(f"name=bench,kind=store,source={store},query=hidden,topk={topk}")
    return StoreFunction(config, spec)


def time_steps(fn, tokens: int, hidden: int, window: int, repeats: int) -> float:
    x = torch.randn(tokens, hidden, requires_grad=True)
    context = torch.zeros(tokens, 2 + window, dtype=torch.long)
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up (page cache, allocator)
        t0 = time.perf_counter()
        out, _ = fn(x, torch.ones(tokens), context=context)
        out.sum().backward()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def reuse_function(store: str, hidden: int, vocab: int, topk: int, reuse: bool):
    """(the global-bank context-query StoreFunction, its config)."""
    from neon.config import NeonConfig
    from neon.flaming.io import io_specs
    from neon.flaming.store import StoreFunction

    config = NeonConfig(num_layers=1, hidden_size=hidden, num_attention_heads=4, vocab_size=vocab,
                        flaming_moe="between", flaming_layer_functions=1, flaming_topk=1,
                        flaming_io_reuse_search=reuse,
                        flaming_io_functions=[f"name=bench,kind=store,source={store},query=context,"
                                              f"topk={topk},bank=global"])
    return StoreFunction(config, io_specs(config)[0]), config


def time_reuse(store: str, args, tokens: int, reuse: bool) -> float:
    """Seconds per micro-batch of `tokens` tokens for the L layers' reads of one shared function."""
    from neon.flaming.io import token_context
    from neon.flaming.search_reuse import append_searches, build_context_searches

    fn, config = reuse_function(store, args.hidden, args.vocab, args.topk, reuse)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (1, tokens), generator=gen)
    routed = max(1, int(round(args.routed_fraction * tokens)))
    layers = [torch.randperm(tokens, generator=gen)[:routed] for _ in range(args.reuse_layers)]
    xs = [torch.randn(routed, args.hidden, requires_grad=True) for _ in layers]
    searches = build_context_searches(config)
    times = []
    for _ in range(args.repeats + 1):  # the first is a warm-up (page cache, allocator)
        t0 = time.perf_counter()
        context = append_searches(token_context(ids, config.flaming_io_context_window), searches)
        context = context.reshape(tokens, -1)
        for rows, x in zip(layers, xs):
            out, _ = fn(x, torch.ones(routed), context=fn.own_context(context[rows]))
            out.sum().backward()
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
    p.add_argument("--tokens", type=int, nargs="+", default=[256, 1024], help="routed tokens per step")
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
            return 0
        print(f"{'entries':>10} {'tokens':>7} {'s/step':>9} {'keys scanned/s':>15}")
        for n in args.entries:
            store = os.path.join(work, f"store_{n}")
            write_random_store(store, n, args.key_dim, args.value_width, args.vocab)
            fn = io_function(store, args.hidden, args.vocab, args.topk)
            for t in args.tokens:
                s = time_steps(fn, t, args.hidden, window=4, repeats=args.repeats)
                print(f"{n:>10} {t:>7} {s:>9.4f} {n * t / s:>15.3g}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
