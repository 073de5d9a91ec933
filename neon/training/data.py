"""A run's micro-batches on this data-parallel rank: megatron-core datasets from the `data` and
`schedule` config sections, served by Megatron-LM's pretraining sampler (neon/training/batches.py).
"""

from __future__ import annotations

import os

from neon.errors import InfrastructureError
from neon.training import batches


def data_files(data) -> dict:
    """{path: (size, mtime_ns)} of the .bin/.idx files of the run's data prefixes (none with mock data)."""
    from neon.data.checks import parse_data_path

    paths = [p for p in (data.data_path, data.train_data_path, data.valid_data_path, data.test_data_path) if p]
    prefixes = [prefix for path in paths for prefix in parse_data_path(path)[0]]
    return data_files_state({f"{p}{ext}": None for p in prefixes for ext in (".bin", ".idx")})


def data_files_state(paths) -> dict:
    out = {}
    for path in paths:
        try:
            st = os.stat(path)
            out[path] = (st.st_size, st.st_mtime_ns)
        except OSError:
            out[path] = None
    return out


def data_arg(iterators: list):
    """What megatron's schedules take: one iterator, or a list of one per model chunk when interleaved."""
    return iterators if len(iterators) > 1 else iterators[0]


class TrainingData:
    def __init__(self, data, schedule, *, vocab_size: int, num_chunks: int, dp_rank: int, dp_size: int):
        """data: the run's `data` section; schedule: its `schedule` section (seed, batch sizes,
        sample counts); vocab_size: the model's (padded) vocabulary."""
        from neon.data import build_datasets, load_tokenizer

        # mock data without a tokenizer: the vocabulary's last id ends documents
        self.tokenizer = load_tokenizer(data.tokenizer_model, data.tokenizer_type) if data.tokenizer_model else None
        eod = self.tokenizer.eod if self.tokenizer is not None else vocab_size - 1
        self.train, self.valid, self.test = build_datasets(data, schedule, vocab_size=vocab_size, eod_id=eod)
        self.num_workers, self.eval_samples = data.num_workers, schedule.eval_iters * schedule.global_batch_size
        self.num_chunks = num_chunks
        self.loader_args = dict(micro_batch_size=schedule.micro_batch_size, dp_rank=dp_rank, dp_size=dp_size)
        self.opened: list = []  # iterators with worker processes, shut down by close()
        self.files = data_files(data)  # {path: (size, mtime)} the run started with

    def check_unchanged(self) -> None:
        """InfrastructureError if a data file changed or vanished since the run started (its
        memory map would give other tokens, or fault)."""
        now = data_files_state(self.files)
        changed = [path for path, was in self.files.items() if now[path] != was]
        if changed:
            raise InfrastructureError(f"data file {changed[0]} changed or vanished during the run (size and time "
                                      f"{self.files[changed[0]]}, now {now[changed[0]]}): the samples would no "
                                      f"longer be the ones the run's position counts. Fix: restore the file the run "
                                      f"started with, then resume from the latest checkpoint.")

    def train_batches(self, consumed_samples: int):
        """Training micro-batches from the global batch after `consumed_samples` on."""
        iterators = batches.iterators(self.train, num_chunks=self.num_chunks, consumed_samples=consumed_samples,
                                      num_workers=self.num_workers, **self.loader_args)
        self.opened += iterators
        return data_arg(iterators)

    def close(self) -> None:
        """Shut down the DataLoader worker processes (they ignore the stop signals, and an exit that
        skipped this would wait for them forever at interpreter shutdown)."""
        for iterator in self.opened:
            batches.shut_down(iterator)
        self.opened.clear()

    def valid_batches(self, split: str = "valid"):
        """The micro-batches of the validation (or test) split, the same ones at every evaluation."""
        return data_arg(batches.iterators(getattr(self, split), num_chunks=self.num_chunks, consumed_samples=0,
                                          num_workers=0, total_samples=self.eval_samples, **self.loader_args))
