"""Micro-batches for one data-parallel rank, resumable at any consumed-sample count.

Megatron-LM's MegatronPretrainingSampler: the global batch of step k holds samples
[k * gbs, (k + 1) * gbs) of the (already shuffled) GPTDataset; data-parallel rank r takes
micro-batches of size mbs from each consecutive block of mbs * dp samples. Resuming at
`consumed_samples` continues exactly where the previous run stopped.

Worker processes ignore the stop signals (SIGTERM, SIGUSR1, SIGINT). Slurm and torchrun send
them to the trainer's whole process group, DataLoader workers included; torch's workers die on
SIGTERM by default and the trainer's next batch then fails ("DataLoader worker (pid N) is killed
by signal: Terminated") before it can save. Ignoring them lets the trainer finish the step, save
and exit. Every way out of the Trainer shuts the workers down (`shut_down`; an exit that skipped
it would wait for them forever at interpreter shutdown), and a worker whose trainer was killed
exits on its own (torch's worker watchdog notices the parent is gone).
"""

from __future__ import annotations

import signal

import torch
from torch.utils.data import DataLoader


class PretrainingSampler:
    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int):
        self.total, self.consumed = total_samples, consumed_samples
        self.mbs, self.rank, self.dp = micro_batch_size, dp_rank, dp_size

    def __len__(self) -> int:
        return (self.total - self.consumed) // (self.mbs * self.dp)

    def __iter__(self):
        block = self.mbs * self.dp
        start = self.rank * self.mbs
        for first in range(self.consumed, self.total - block + 1, block):
            yield list(range(first + start, first + start + self.mbs))


WORKER_IGNORED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def ignore_stop_signals(_worker_id: int) -> None:
    """DataLoader worker_init_fn: leave the stop signals to the trainer (runs after torch installs
    its own worker signal handlers, so it wins)."""
    for sig in WORKER_IGNORED_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def loader(dataset, *, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int,
           num_workers: int, total_samples: int | None = None) -> DataLoader:
    total = len(dataset) if total_samples is None else min(total_samples, len(dataset))
    sampler = PretrainingSampler(total, consumed_samples, micro_batch_size, dp_rank, dp_size)
    # Each iterator draws its workers' base seed from `generator`, a generator of its own: building
    # one never moves torch's default generator, which the restored RNG state of a resume sets and
    # the Gumbel router's noise draws from (a resume builds its iterator after the restore, the
    # uninterrupted run before step 1). The samples do not depend on it (the sampler is ordered).
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                      worker_init_fn=ignore_stop_signals if num_workers > 0 else None,
                      persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available(),
                      generator=torch.Generator().manual_seed(0))


def shut_down(iterator) -> None:
    """Stop an iterator's worker processes now (torch's own shutdown of a multi-process iterator)."""
    stop = getattr(iterator, "_shutdown_workers", None)
    if stop is not None:
        stop()


def iterators(dataset, *, num_chunks: int, **kwargs) -> list:
    """One iterator per model chunk (the interleaved schedule pulls from each chunk's own);
    all yield the same batches."""
    return [iter(loader(dataset, **kwargs)) for _ in range(num_chunks)]
