"""Prepare a corpus for training: split by document, train a tokenizer, write token shards.

`prepare("shakespeare", "data/shakespeare")` writes `tokenizer.json`, `train_000.bin`,
`val_000.bin` and, last, `manifest.json` (see `lmscale.data.manifest`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as HFTokenizer

from lmscale.data.corpus import Document, iter_documents, read_text
from lmscale.data.manifest import MANIFEST_FILE, Manifest, Shard, Split
from lmscale.errors import LmscaleError
from lmscale.tokenizer import Tokenizer
from lmscale.tokenizer.pretrained import read_settings

TOKENIZER_FILE = "tokenizer.json"
SETTINGS_FILE = "tokenizer_config.json"
SPLITS = ("train", "val")
_ENCODE_BATCH_DOCS = 64  # documents encoded per call: parallel, yet bounded memory


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id of a vocabulary of `vocab_size`."""
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def prepare(
    corpus: str,
    out: str | Path,
    vocab_size: int = 4096,
    val_fraction: float = 0.1,
    seed: int = 0,
    shard_tokens: int = 2**24,
    tokenizer: Tokenizer | None = None,
) -> Manifest:
    """Tokenize a corpus into train/val token shards with a manifest.

    Args:
        corpus: a corpus spec (see `lmscale.data.corpus.iter_documents`).
        out: the output folder (created; an earlier preparation there is replaced).
        vocab_size: tokenizer vocabulary size, special tokens included.
        val_fraction: share of documents held out for validation, in [0, 1).
        seed: seeds the choice of validation documents.
        shard_tokens: maximum number of tokens per shard file.
        tokenizer: tokenize with this one (a pretrained model's, to train or distill it on the
            data) instead of training one; `vocab_size` is then unused. Its settings (special
            tokens, chat template) are kept beside it, in `tokenizer_config.json`.

    Returns:
        The manifest written to `out/manifest.json`.
    """
    _check_options(val_fraction, shard_tokens)
    # NOTE: the corpus is read before `out` is touched, so a bad corpus leaves an earlier
    # preparation there whole (and creates no folder).
    documents = list(iter_documents(corpus))
    splits = split_documents(documents, val_fraction, seed)
    out = _clear_output(Path(out))
    if tokenizer is None:
        tokenizer = Tokenizer.train((doc.text for doc in splits["train"]), vocab_size)
        tokenizer.save(out / TOKENIZER_FILE)
    else:
        tokenizer.save_pretrained(out)
    dtype = token_dtype(tokenizer.vocab_size)
    manifest = Manifest(
        corpus=str(corpus),
        tokenizer=TOKENIZER_FILE,
        vocab_size=tokenizer.vocab_size,
        dtype=dtype.name,
        eos_id=tokenizer.eos_id,
        splits={
            name: _write_split(out, name, docs, tokenizer, dtype, shard_tokens)
            for name, docs in splits.items()
        },
    )
    manifest.save(out)  # NOTE: last, so a folder without it is known to be incomplete
    return manifest


def data_tokenizer(data_dir: str | Path) -> Tokenizer:
    """The tokenizer a prepared folder was tokenized with, its special tokens included."""
    data_dir = Path(data_dir)
    path = data_dir / TOKENIZER_FILE
    if not (data_dir / SETTINGS_FILE).is_file():
        return Tokenizer.load(path)
    # A pretrained model's tokenizer (see `prepare`): its own special tokens, from the settings.
    # NOTE: not `Tokenizer.load_pretrained`, which first reads tokenizer.json with lmscale's
    # special tokens and so refuses tokenizers without them.
    text = read_text(path)
    try:
        settings = read_settings(data_dir, HFTokenizer.from_str(text))
    except Exception as err:  # tokenizers raises a bare Exception on bad input
        raise LmscaleError(f"corrupt tokenizer {path}: {err}") from None
    return Tokenizer.from_json(text, str(path), **settings)


def split_documents(
    documents: list[Document], val_fraction: float, seed: int
) -> dict[str, list[Document]]:
    """Split documents into train and val, deterministically from `seed`.

    With two or more documents, whole documents go to val (at least one when
    `val_fraction > 0`, never all). A single document is cut at a line boundary near
    `1 - val_fraction` of its length instead.

    Returns:
        `{"train": [...], "val": [...]}`, each in corpus order.
    """
    if not documents:
        raise LmscaleError("the corpus has no documents")
    if len(documents) == 1:
        return _split_one(documents[0], val_fraction)
    n_val = 0 if val_fraction == 0 else max(1, round(len(documents) * val_fraction))
    n_val = min(n_val, len(documents) - 1)
    order = np.random.default_rng(seed).permutation(len(documents))
    val = set(order[:n_val].tolist())
    return {
        "train": [doc for i, doc in enumerate(documents) if i not in val],
        "val": [doc for i, doc in enumerate(documents) if i in val],
    }


def _split_one(doc: Document, val_fraction: float) -> dict[str, list[Document]]:
    cut = _line_cut(doc.text, int(len(doc.text) * (1 - val_fraction)))
    train = Document(f"{doc.name}[:{cut}]", doc.text[:cut])
    val = Document(f"{doc.name}[{cut}:]", doc.text[cut:])
    return {"train": [train], "val": [val] if val.text else []}


def _line_cut(text: str, target: int) -> int:
    """The start of the first line at or after `target`, else of the last line before it."""
    if target >= len(text):
        return len(text)
    after = text.find("\n", target)
    if after != -1 and after + 1 < len(text):
        return after + 1
    before = text.rfind("\n", 0, target)
    # NOTE: no usable newline at all: cut mid-line rather than leave val empty.
    return before + 1 if before != -1 else target


def _write_split(
    out: Path,
    name: str,
    docs: list[Document],
    tokenizer: Tokenizer,
    dtype: np.dtype,
    shard_tokens: int,
) -> Split:
    writer = _ShardWriter(out, name, dtype, shard_tokens)
    for start in range(0, len(docs), _ENCODE_BATCH_DOCS):
        batch = [doc.text for doc in docs[start : start + _ENCODE_BATCH_DOCS]]
        for ids in tokenizer.encode_batch(batch):
            writer.write(ids + [tokenizer.eos_id])
    shards = writer.close()
    return Split([doc.name for doc in docs], sum(s.tokens for s in shards), shards)


class _ShardWriter:
    """Appends token ids to `<split>_000.bin`, `<split>_001.bin`, ... of at most `shard_tokens`."""

    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.out, self.split, self.dtype, self.shard_tokens = out, split, dtype, shard_tokens
        self.pending: list[np.ndarray] = []
        self.n_pending = 0
        self.shards: list[Shard] = []

    def write(self, ids: Iterable[int]) -> None:
        self.pending.append(np.asarray(ids, dtype=self.dtype))
        self.n_pending += len(self.pending[-1])
        while self.n_pending >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def close(self) -> list[Shard]:
        if self.n_pending:
            self._flush(self.n_pending)
        return self.shards

    def _flush(self, n: int) -> None:
        tokens = np.concatenate(self.pending)
        data = tokens[:n].tobytes()
        self.pending, self.n_pending = [tokens[n:]], len(tokens) - n
        file = f"{self.split}_{len(self.shards):03d}.bin"
        (self.out / file).write_bytes(data)
        self.shards.append(Shard(file, n, hashlib.sha256(data).hexdigest()))


def _check_options(val_fraction: float, shard_tokens: int) -> None:
    if not 0 <= val_fraction < 1:
        raise LmscaleError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if not isinstance(shard_tokens, int) or shard_tokens < 1:
        raise LmscaleError(f"shard_tokens must be a positive integer, got {shard_tokens!r}")


def _clear_output(out: Path) -> Path:
    """Create `out`, removing a previous preparation's manifest first, then its shards."""
    if out.exists() and not out.is_dir():
        raise LmscaleError(f"output {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_FILE).unlink(missing_ok=True)
    (out / SETTINGS_FILE).unlink(missing_ok=True)
    for split in SPLITS:
        for old in out.glob(f"{split}_*.bin"):
            old.unlink()
    return out
