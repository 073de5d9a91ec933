"""Start-up cost of a Neon process: the import of megatron-core, and the first checkpoint save.

    python tools/benchmark_startup.py [--repeats 3]

Each measurement runs in a fresh interpreter (what every torchrun rank pays), in pairs within
this run, and prints the CPU-seconds (user + system of the child) with the ratio to its baseline:
  import       `import megatron.core` alone (megatron decorates its fused functions with
               torch.compile, which imports TorchDynamo and Inductor) against `import neon` first
               (megatron_plugins/lazy_jit.py defers those decorations to the first call, and
               lazy_wandb.py the wandb import megatron-core makes, to its first use);
  first save   one megatron dist_checkpointing.save of a small state dict, with megatron's
               default result queue (a spawned multiprocessing Manager, which imports torch to
               unpickle the first results) against Neon's in-process queue
               (neon/training/checkpointing.py:prepare_writer).
The median of --repeats runs is shown, and for the save how many helper processes were still
running after it (megatron's Manager stays for the life of the process).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

IMPORT_BASE = "import megatron.core"
IMPORT_NEON = "import neon, megatron.core"
SAVE = """
import sys, tempfile, torch
import neon
from megatron_plugins import distributed
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing import ShardedTensor
distributed.initialize()
if sys.argv[1] == "neon":
    from neon.training import checkpointing
    checkpointing.prepare_writer()
w = torch.randn(256, 256)
state = {"w": ShardedTensor.from_rank_offsets("w", w, replica_id=0)}
with tempfile.TemporaryDirectory() as d:
    dist_checkpointing.save(state, d)
import multiprocessing
print("helper processes after the save:", len(multiprocessing.active_children()))
distributed.shutdown()
"""


def child_cpu_seconds(code: str, *args: str) -> tuple[float, str]:
    """(user + system CPU-seconds of `python -c code args` and its process tree, its stdout)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("MASTER_PORT", None)
    out = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env, check=True, capture_output=True,
                         text=True, timeout=300).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), out.strip()


def measure(base: tuple, neon: tuple, repeats: int) -> tuple[float, float, str, str]:
    """Medians of `repeats` alternating runs of the baseline and Neon's way, and what each printed."""
    b, n = [], []
    for _ in range(repeats):
        b.append(child_cpu_seconds(*base))
        n.append(child_cpu_seconds(*neon))
    return statistics.median(t for t, _ in b), statistics.median(t for t, _ in n), b[-1][1], n[-1][1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    rows = [("import megatron.core", *measure((IMPORT_BASE,), (IMPORT_NEON,), args.repeats)),
            ("first checkpoint save (process)", *measure((SAVE, "megatron"), (SAVE, "neon"), args.repeats))]
    print(f"{'what (fresh interpreter, CPU-s)':34} {'megatron':>9} {'neon':>9} {'neon/megatron':>14}")
    for name, base, neon, base_out, neon_out in rows:
        print(f"{name:34} {base:9.2f} {neon:9.2f} {neon / base:13.2f}x")
        if base_out:
            print(f"  megatron: {base_out}; neon: {neon_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
