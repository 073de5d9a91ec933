"""What the machine did when a job fails: a lost rank, a rank that stopped answering, a DataLoader
worker that died. Each becomes an InfrastructureError (exit status 7) whose message names the
rank, from what every rank leaves in the rendezvous store (torchrun's agent holds it, so it
outlives the workers):

    neon/step/<rank>     the last training step this rank started (each step, `mark_step`)
    neon/failed/<rank>   the one-line error this rank stopped on (`report_failure`)

A rank that sees a peer's connection close (gloo: "Connection reset/closed by peer"; NCCL: the
communicator aborted) names the ranks that reported a failure, or else says that a rank was
killed or lost; a collective that timed out (--distributed-timeout-minutes) names the ranks whose
last step is behind the others'. Store calls are bounded (STORE_TIMEOUT): a failing job never
waits on them.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Optional

import torch.distributed as dist

from neon.errors import InfrastructureError, NeonError

STORE_TIMEOUT = timedelta(seconds=5)
LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "remote process exited",
        "NCCL communicator was aborted", "ProcessGroupNCCL is aborted")
TIMED_OUT = ("Timed out waiting", "Watchdog caught collective operation timeout", "timed out")
WORKER_DIED = ("DataLoader worker (pid", "exited unexpectedly")


def _store():
    if not dist.is_initialized():
        return None
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(STORE_TIMEOUT)
        return store
    except Exception:  # noqa: BLE001 - diagnosis is best effort
        return None


def mark_step(iteration: int) -> None:
    """This rank started `iteration` (read back when a collective times out)."""
    store = _store()
    if store is not None:
        try:
            store.set(f"neon/step/{dist.get_rank()}", str(iteration))
        except Exception:  # noqa: BLE001 - best effort
            pass


def report_failure(e: BaseException) -> None:
    """Leave this rank's error in the store for the other ranks' messages."""
    store = _store()
    if store is None:
        return
    try:
        store.set(f"neon/failed/{dist.get_rank()}", f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                  if str(e) else type(e).__name__)
    except Exception:  # noqa: BLE001 - best effort
        pass


def _read(store, key: str) -> Optional[str]:
    try:
        return store.get(key).decode() if store.check([key]) else None
    except Exception:  # noqa: BLE001 - best effort
        return None


def _failed_ranks(store) -> dict[int, str]:
    me = dist.get_rank()
    return {r: v for r in range(dist.get_world_size()) if r != me and (v := _read(store, f"neon/failed/{r}"))}


def _in_dataloader(e: BaseException) -> bool:
    """Raised inside torch's DataLoader (reading from a worker): a killed worker can surface as a
    bare ConnectionResetError from its queue rather than torch's own message."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        tb = e.__traceback__
        while tb is not None:
            if "torch/utils/data/" in tb.tb_frame.f_code.co_filename.replace("\\", "/"):
                return True
            tb = tb.tb_next
        e = e.__cause__ or e.__context__
    return False


def diagnose(e: BaseException, timeout_minutes: float, latest: str) -> Optional[NeonError]:
    """The InfrastructureError that `e` (an error of torch.distributed or of the DataLoader) stands
    for, naming the rank and what to do; None when it is none of these. `latest`: a clause on the
    checkpoint to resume from."""
    text = str(e)
    if isinstance(e, NeonError) or not isinstance(e, (RuntimeError, OSError)):
        return None
    if (all(w in text for w in WORKER_DIED) or "DataLoader worker" in text and "killed by signal" in text
            or _in_dataloader(e) and any(w in text for w in LOST)):
        return InfrastructureError(f"a DataLoader worker process died ({text.splitlines()[0][:200]}): a data file "
                                   f"may have changed or vanished under the run, or the machine ran out of memory; "
                                   f"{latest}. Fix: check the data files (--data-path) and the memory, then resume.")
    lost, timed_out = any(w in text for w in LOST), any(w in text for w in TIMED_OUT)
    if not (lost or timed_out):
        return None
    store = _store()
    failed = _failed_ranks(store) if store is not None else {}
    if failed:
        who = "; ".join(f"rank {r} stopped on {why}" for r, why in sorted(failed.items()))
        return InfrastructureError(f"another rank failed ({who}), so this rank's collective could not finish; "
                                   f"{latest}. Fix: see that rank's error above, then resume.")
    if lost:
        return InfrastructureError(f"a rank was lost: its connection to this rank closed without an error report "
                                   f"(its process was killed, ran out of memory, or its node went away); {latest}. "
                                   f"Fix: check that node and the job's logs, then resume.")
    steps = {}
    if store is not None:
        for r in range(dist.get_world_size()):
            step = _read(store, f"neon/step/{r}")
            steps[r] = int(step) if step and step.isdigit() else 0
    behind = [r for r, s in steps.items() if steps and s < max(steps.values())]
    who = (f"rank(s) {behind} stopped answering (the last step they started: {min(steps[r] for r in behind)}, the "
           f"others' {max(steps.values())})" if behind else "a rank stopped answering")
    return InfrastructureError(f"a collective timed out after {timeout_minutes:g} minutes (--distributed-timeout-"
                               f"minutes): {who}; {latest}. Fix: look at what those ranks were doing (py-spy dump "
                               f"--pid), then resume.")
