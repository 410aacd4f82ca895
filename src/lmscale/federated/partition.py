"""Client partitions: whose text each federated client trains on, and what it holds out.

A `--data` spec names one of:
- `shakespeare-genres`: the bundled plays, one client per genre folder (comedies, histories,
  problems, roman, romances, tragedies). The genres differ in vocabulary, names and verse, so
  the partition is non-IID the way real sites are. Each client holds out its last play (in
  sorted order) and trains on the others;
- a folder of per-client data: each entry is one client, named by it: a sub-folder of `.txt` /
  `.md` files, a `.jsonl` file of {"text": ...} lines, or a text file. A client with several
  documents holds out the last tenth of them (at least one); a client with a single document
  holds out its last tenth of lines.

The global held-out set is the union of the clients' held-out text: it is only read where the
evaluation runs (the server's global evaluation stands in for a curated test set that the
federation agrees on; in a real deployment it would be a public set, not the clients' own).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lmscale.data.corpus import TEXT_SUFFIXES, Document, iter_documents, shakespeare_dir
from lmscale.errors import LmscaleError

SHAKESPEARE_GENRES = "shakespeare-genres"
HELDOUT_FRACTION = 0.1


@dataclass(frozen=True)
class ClientData:
    """One client's documents: what it trains on and what it holds out."""

    name: str
    train: tuple[Document, ...]
    heldout: tuple[Document, ...]

    @property
    def train_text(self) -> str:
        return "\n\n".join(doc.text for doc in self.train)

    @property
    def heldout_text(self) -> str:
        return "\n\n".join(doc.text for doc in self.heldout)


def client_partitions(spec: str | Path, clients: int | None = None) -> list[ClientData]:
    """The clients of a data spec (see the module docstring), in a fixed order.

    Args:
        spec: `shakespeare-genres` or a folder with one entry per client.
        clients: how many to use (the first ones); None takes them all.

    Raises:
        LmscaleError: the spec names no data, or fewer clients than asked for.
    """
    if str(spec) == SHAKESPEARE_GENRES:
        parts = _genre_clients()
    else:
        parts = _folder_clients(Path(spec))
    if clients is not None:
        if clients < 1:
            raise LmscaleError(f"--clients must be a positive integer, got {clients}")
        if clients > len(parts):
            raise LmscaleError(
                f"--clients {clients}: {spec} has only {len(parts)} clients "
                f"({', '.join(p.name for p in parts)})"
            )
        parts = parts[:clients]
    return parts


def _genre_clients() -> list[ClientData]:
    plays = shakespeare_dir()
    out = []
    for genre in sorted(p for p in plays.iterdir() if p.is_dir() and not p.name.startswith("_")):
        docs = list(iter_documents(genre))
        if len(docs) < 2:
            raise LmscaleError(f"genre {genre.name} has {len(docs)} play: cannot hold one out")
        out.append(ClientData(genre.name, tuple(docs[:-1]), (docs[-1],)))
    return out


def _folder_clients(folder: Path) -> list[ClientData]:
    if not folder.is_dir():
        raise LmscaleError(
            f"unknown federated data {str(folder)!r}: expected '{SHAKESPEARE_GENRES}' or a "
            "folder with one sub-folder, .jsonl or text file per client"
        )
    entries = sorted(
        p for p in folder.iterdir()
        if not p.name.startswith(".") and (p.is_dir() or p.suffix in (*TEXT_SUFFIXES, ".jsonl"))
    )  # fmt: skip
    if not entries:
        raise LmscaleError(f"{folder} holds no client data (sub-folders, .jsonl or text files)")
    return [_split(_client_name(entry), list(iter_documents(entry))) for entry in entries]


def _client_name(entry: Path) -> str:
    return entry.name if entry.is_dir() else entry.stem


def _split(name: str, docs: list[Document]) -> ClientData:
    """Hold out the last tenth of the documents, or of the lines of a single document."""
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise LmscaleError(f"client {name!r} has no text")
    if len(docs) > 1:
        cut = len(docs) - max(1, round(len(docs) * HELDOUT_FRACTION))
        return ClientData(name, tuple(docs[:cut]), tuple(docs[cut:]))
    (doc,) = docs
    lines = doc.text.splitlines(keepends=True)
    if len(lines) < 2:
        raise LmscaleError(f"client {name!r} has a single line: nothing to hold out")
    cut = len(lines) - max(1, round(len(lines) * HELDOUT_FRACTION))
    head, tail = "".join(lines[:cut]), "".join(lines[cut:])
    return ClientData(name, (Document(doc.name, head),), (Document(doc.name + ":heldout", tail),))
