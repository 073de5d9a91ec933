"""Neon's data pipeline: tokenizer, .bin/.idx preprocessing, megatron-core datasets, demo corpus."""

from neon.data.checks import DataFileInfo, check_data_file, check_data_files, parse_data_path
from neon.data.datasets import build_datasets
from neon.data.errors import DataError
from neon.data.tokenizer import NeonTokenizer

__all__ = ["DataError", "DataFileInfo", "NeonTokenizer", "build_datasets", "check_data_file", "check_data_files",
           "parse_data_path"]
