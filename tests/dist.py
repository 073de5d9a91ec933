"""Run a function in N real torch.distributed processes (gloo) and collect each rank's result.

    results = run_distributed(check_fn, world_size=2, tp=2, kwargs={"seed": 1})

`check_fn(**kwargs)` must be a module-level function (it is pickled by name). Each rank is a new
process forked from a multiprocessing forkserver: the server (one per test process) imports torch,
megatron-core, Neon's model and transformers' Mistral once (PRELOAD), so a rank starts in
milliseconds instead of re-importing them (about 5 CPU-seconds each); it holds no other state,
since nothing runs in it but imports. Each process sets OMP_NUM_THREADS=1, joins a gloo group
through a rendezvous store that the test process hosts on a port the kernel picks (as torchrun's
agent does), and initialises megatron-core's parallel state with the given layout (the CPU runtime
is installed there).
Whatever a rank returns (tensors included) comes back in rank order. An exception on any rank
fails the calling test with that rank's traceback; a rank that does not finish within
`timeout` seconds fails it too, and every process is killed: a hang never stalls CI.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue
import time
import traceback
from datetime import timedelta

PRELOAD = ["tests", "megatron_plugins.distributed", "neon.model", "neon.training.step", "tests.parity",
           "transformers.models.mistral.modeling_mistral"]  # "tests" first: it installs lazy_jit


class DistributedFailure(AssertionError):
    pass


def _worker(rank, world_size, port, layout, fn, kwargs, results):
    # the store is the test process's (as torchrun's agent hosts its workers'): ranks only connect
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1", TORCHELASTIC_USE_AGENT_STORE="True")
    try:
        import torch

        torch.set_num_threads(1)
        from megatron_plugins import distributed

        distributed.initialize(**layout)
        value = fn(**kwargs)
        buf = io.BytesIO()
        torch.save(value, buf)
        results.put((rank, "ok", buf.getvalue()))
        distributed.shutdown()
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        results.put((rank, "error", traceback.format_exc()))


def run_distributed(fn, world_size: int = 2, *, tp: int = 1, pp: int = 1, ep: int = 1,
                    vpp: int | None = None, etp: int | None = None, cp: int = 1, seed: int = 1234,
                    kwargs: dict | None = None, timeout: float = 240.0) -> list:
    """Run fn(**kwargs) on `world_size` ranks; return the list of per-rank results (etp: the
    experts' tensor-parallel size, megatron's default tp when None; cp: the context-parallel size)."""
    import torch

    assert world_size <= 4, "at most 4 processes on this machine"
    layout = dict(tensor_parallel=tp, pipeline_parallel=pp, expert_parallel=ep,
                  virtual_pipeline=vpp, seed=seed, expert_tensor_parallel=etp,
                  context_parallel=cp)
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # takes effect when this process first starts the server
    results = ctx.Queue()
    # The rendezvous store lives here, on a port the kernel picks and this process holds until the
    # ranks are done: no window in which another process can take a port chosen in advance.
    store = torch.distributed.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False,
                                       timeout=timedelta(seconds=timeout))
    port = store.port
    procs = [ctx.Process(target=_worker, daemon=True,
                         args=(r, world_size, port, layout, fn, kwargs or {}, results))
             for r in range(world_size)]
    for p in procs:
        p.start()
    collected, deadline = {}, time.monotonic() + timeout
    try:
        while len(collected) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(range(world_size)) - set(collected))
                raise DistributedFailure(f"ranks {missing} did not finish within {timeout:.0f} s "
                                         f"(hang or deadlock in {fn.__name__})")
            try:
                rank, status, payload = results.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs)
                        if p.exitcode not in (None, 0) and r not in collected]
                if dead:
                    raise DistributedFailure(
                        f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode}"
                    ) from None
                continue
            if status == "error":
                raise DistributedFailure(f"rank {rank} of {world_size} failed:\n{payload}")
            collected[rank] = torch.load(io.BytesIO(payload), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
        del store
    return [collected[r] for r in range(world_size)]
