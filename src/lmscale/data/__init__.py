"""Corpora, tokenized shards with a manifest, and the training batch loader."""

from lmscale.data.corpus import Document, iter_documents, shakespeare_dir
from lmscale.data.loader import Loader, TokenDataset
from lmscale.data.manifest import FORMAT_VERSION, Manifest, Shard, Split
from lmscale.data.prepare import data_tokenizer, prepare, split_documents, token_dtype

__all__ = [
    "FORMAT_VERSION",
    "Document",
    "Loader",
    "Manifest",
    "Shard",
    "Split",
    "TokenDataset",
    "data_tokenizer",
    "iter_documents",
    "prepare",
    "shakespeare_dir",
    "split_documents",
    "token_dtype",
]
