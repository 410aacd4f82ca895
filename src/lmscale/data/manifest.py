"""The manifest of a prepared data folder: what each shard holds, and its checksum.

A prepared folder looks like:

    tokenizer.json
    train_000.bin  train_001.bin ...   flat token ids (numpy, `dtype` below), no header
    val_000.bin ...
    manifest.json                      written last: without it the folder is incomplete
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmscale.errors import LmscaleError

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"


@dataclass
class Shard:
    """One token file of a split."""

    file: str
    """File name, relative to the data folder."""
    tokens: int
    """Number of token ids in the file."""
    sha256: str
    """Hex SHA-256 of the file's bytes."""


@dataclass
class Split:
    """One split (`train`, `val`) of a prepared corpus."""

    documents: list[str]
    """Names of the documents in this split, in stream order."""
    tokens: int
    """Total token count over all shards (each document is followed by an eos token)."""
    shards: list[Shard] = field(default_factory=list)


@dataclass
class Manifest:
    """Everything needed to read a prepared data folder back.

    Use `Manifest.load(dir)` to read one; it checks every shard unless told not to.
    """

    corpus: str
    tokenizer: str
    vocab_size: int
    dtype: str
    eos_id: int
    splits: dict[str, Split]
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        splits = {
            name: Split(
                documents=list(s["documents"]),
                tokens=int(s["tokens"]),
                shards=[Shard(**shard) for shard in s["shards"]],
            )
            for name, s in data["splits"].items()
        }
        return cls(**{**data, "splits": splits})

    def save(self, directory: str | Path) -> None:
        """Write `manifest.json` atomically (temp file + rename), so readers never see half."""
        path = Path(directory) / MANIFEST_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)

    @classmethod
    def load(cls, directory: str | Path, verify: bool = True) -> Manifest:
        """Read the manifest of a prepared data folder.

        Args:
            directory: the folder `prepare` wrote.
            verify: also check every shard's existence, byte size and SHA-256.

        Returns:
            The manifest.
        """
        directory = Path(directory)
        manifest = cls._read(directory / MANIFEST_FILE)
        if verify:
            for split in manifest.splits.values():
                for shard in split.shards:
                    verify_shard(directory / shard.file, shard, np.dtype(manifest.dtype))
        return manifest

    @classmethod
    def _read(cls, path: Path) -> Manifest:
        if not path.is_file():
            raise LmscaleError(f"no {MANIFEST_FILE} in {path.parent}: not a prepared data folder")
        try:
            manifest = cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise LmscaleError(f"corrupt manifest {path}: {err}") from None
        if manifest.format_version != FORMAT_VERSION:
            raise LmscaleError(
                f"{path} has format version {manifest.format_version}, "
                f"this lmscale reads version {FORMAT_VERSION}"
            )
        return manifest


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def verify_shard(path: Path, shard: Shard, dtype: np.dtype) -> None:
    """Raise `LmscaleError` naming `path` unless it exists with the right size and SHA-256."""
    if not path.is_file():
        raise LmscaleError(f"missing shard {path}")
    expected = shard.tokens * dtype.itemsize
    if path.stat().st_size != expected:
        raise LmscaleError(
            f"corrupt shard {path}: {path.stat().st_size} bytes, expected {expected}"
        )
    if file_sha256(path) != shard.sha256:
        raise LmscaleError(f"corrupt shard {path}: sha256 mismatch")
