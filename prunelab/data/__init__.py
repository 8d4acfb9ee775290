"""Datasets for pruning experiments, loaded whole into memory as tensors.

>>> from prunelab.data import load_dataset
>>> ds = load_dataset("digits")          # embedded, needs no files
>>> ds.x_train.shape, ds.n_classes
(torch.Size([1437, 1, 8, 8]), 10)
>>> lm = load_dataset("pydocs", vocab_size=8192, seq_len=128)   # a TextDataset of token ids

Files are read from the data root (``root=`` > ``$PRUNELAB_DATA`` > cache dir)
and, failing that, the cache dir; anything written goes to a writable one of the
two. See docs/data.md.
"""

from prunelab.data._paths import cache_dir, data_root
from prunelab.data.api import dataset_info, fetch, load_dataset
from prunelab.data.catalog import DATASETS
from prunelab.data.dataset import Dataset
from prunelab.data.errors import ChecksumError, DatasetNotFoundError
from prunelab.data.examples import dry_run_inputs, takes_token_ids
from prunelab.data.recipes import generate_variant
from prunelab.data.text import TextDataset, sequences
from prunelab.data.text_files import load_text
from prunelab.data.tokenizer import train_tokenizer

__all__ = [
    "DATASETS",
    "ChecksumError",
    "Dataset",
    "DatasetNotFoundError",
    "TextDataset",
    "cache_dir",
    "data_root",
    "dataset_info",
    "dry_run_inputs",
    "fetch",
    "generate_variant",
    "load_dataset",
    "load_text",
    "sequences",
    "takes_token_ids",
    "train_tokenizer",
]
