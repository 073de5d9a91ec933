"""megatron-core's GPTDataset with its own index cache folder, for blends built without torch.distributed.

megatron-core 0.16.1's BlendedDataset calls torch.distributed.get_rank() on a cache miss, so a
blend with a cache folder fails in a process without torch.distributed (tests, notebooks, data
inspection). There, build_split_datasets turns the blend's cache off and hands the folder to this
GPTDataset through `NeonGPTDatasetConfig.gpt_index_cache`: the GPTDataset indices (the expensive
part) are still cached, the blending indices are built in memory. The class keeps megatron's
name, so its cache files are the ones a distributed run writes and reads. Module level, so
DataLoader workers can pickle it.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from megatron.core.datasets import gpt_dataset as mcore


@dataclasses.dataclass
class NeonGPTDatasetConfig(mcore.GPTDatasetConfig):
    gpt_index_cache: Optional[str] = None
    """Where this GPTDataset caches its indices when `path_to_cache` (the blend's cache) is off."""


class GPTDataset(mcore.GPTDataset):
    def __init__(self, indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config):
        if getattr(config, "gpt_index_cache", None) is not None:
            split_matrix = config.split_matrix  # replace() recomputes it from the split string
            config = dataclasses.replace(config, path_to_cache=config.gpt_index_cache, gpt_index_cache=None)
            config.split_matrix = split_matrix
        super().__init__(indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config)

