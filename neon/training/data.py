"""A run's micro-batches on this data-parallel rank: megatron-core datasets from the `data` and
`schedule` config sections, served by Megatron-LM's pretraining sampler (neon/training/batches.py).
"""

from __future__ import annotations

from neon.training import batches


def data_arg(iterators: list):
    """What megatron's schedules take: one iterator, or a list of one per model chunk when interleaved."""
    return iterators if len(iterators) > 1 else iterators[0]


class TrainingData:
    def __init__(self, data, schedule, *, vocab_size: int, num_chunks: int, dp_rank: int, dp_size: int):
        """data: the run's `data` section; schedule: its `schedule` section (seed, batch sizes,
        sample counts); vocab_size: the model's (padded) vocabulary."""
        from neon.data import NeonTokenizer, build_datasets

        tokenizer = NeonTokenizer(data.tokenizer_model)
        self.train, self.valid, _ = build_datasets(data, schedule, vocab_size=vocab_size, eod_id=tokenizer.eod)
        self.num_workers, self.eval_samples = data.num_workers, schedule.eval_iters * schedule.global_batch_size
        self.num_chunks = num_chunks
        self.loader_args = dict(micro_batch_size=schedule.micro_batch_size, dp_rank=dp_rank, dp_size=dp_size)

    def train_batches(self, consumed_samples: int):
        """Training micro-batches from the global batch after `consumed_samples` on."""
        return data_arg(batches.iterators(self.train, num_chunks=self.num_chunks, consumed_samples=consumed_samples,
                                          num_workers=self.num_workers, **self.loader_args))

    def valid_batches(self):
        """The validation micro-batches, the same ones at every evaluation (needs a validation split)."""
        return data_arg(batches.iterators(self.valid, num_chunks=self.num_chunks, consumed_samples=0, num_workers=0,
                                          total_samples=self.eval_samples, **self.loader_args))
