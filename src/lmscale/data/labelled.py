"""Labelled text for classification: the bundled `shakespeare-genre` set and `{"text", "label"}` JSONL.

`shakespeare-genre` cuts every bundled play into passages of about `passage_words` words (whole
lines, speaker names kept, the play's title line dropped so a passage never names its play) and
labels each with the genre folder the play sits in: comedies, histories, problems, roman,
romances or tragedies. The split is by play, so no line of a test play is ever seen in training:
within each genre the plays are shuffled with a fixed seed, the first goes to `test`, the second
to `val` and the rest to `train` (every genre has at least four plays). The result is deliberately
imbalanced, as the corpus is (histories are 11 of 38 plays), which is why results are reported
against the majority-class baseline and with macro-F1.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from lmscale.data.corpus import jsonl_records, read_text, shakespeare_dir
from lmscale.errors import LmscaleError

SHAKESPEARE_GENRE = "shakespeare-genre"
SPLITS = ("train", "val", "test")
SPLIT_SEED = 0


@dataclass(frozen=True)
class Example:
    """One labelled passage."""

    text: str
    label: str
    source: str
    """Where it came from: `<genre>/<play>` or `<file>:<line>`."""


def genre_splits(seed: int = SPLIT_SEED) -> dict[str, list[str]]:
    """Which plays (`<genre>/<play>`) form each split of `shakespeare-genre` (see the docstring)."""
    plays = shakespeare_dir()
    splits: dict[str, list[str]] = {split: [] for split in SPLITS}
    for genre in sorted(p.name for p in plays.iterdir() if p.is_dir() and p.name[0] != "_"):
        names = sorted(f"{genre}/{f.stem}" for f in (plays / genre).glob("*.md"))
        random.Random(f"{seed}:{genre}").shuffle(names)
        splits["test"].append(names[0])
        splits["val"].append(names[1])
        splits["train"].extend(names[2:])
    return splits


def shakespeare_genre(split: str, passage_words: int = 150) -> list[Example]:
    """The passages of one split of `shakespeare-genre`, in play order.

    Args:
        split: "train", "val" or "test".
        passage_words: a passage ends at the first line break after this many words.

    Returns:
        The split's examples; the label is the play's genre folder.
    """
    if split not in SPLITS:
        raise LmscaleError(f"unknown split '{split}' (choose from {', '.join(SPLITS)})")
    if passage_words < 1:
        raise LmscaleError(f"passage_words must be at least 1, got {passage_words}")
    examples = []
    for play in genre_splits()[split]:
        text = read_text(shakespeare_dir() / f"{play}.md")
        genre = play.split("/")[0]
        examples += [Example(p, genre, play) for p in passages(text, passage_words)]
    return examples


def passages(text: str, words: int) -> list[str]:
    """Consecutive whole lines of `text`, each run closed once it holds `words` words.

    The play's title (`# ...`) is dropped; a last run shorter than half a passage is dropped too,
    so every example has comparable length.
    """
    out, lines, count = [], [], 0
    for line in text.splitlines():
        if line.startswith("# "):
            continue
        lines.append(line)
        count += len(line.split())
        if count >= words:
            out.append("\n".join(lines).strip())
            lines, count = [], 0
    if count >= words / 2:
        out.append("\n".join(lines).strip())
    return out


def read_labelled_jsonl(path: str | Path) -> list[Example]:
    """Examples from a JSONL file of `{"text": str, "label": str | int}` objects, one per line."""
    path = Path(path)
    if not path.is_file():
        raise LmscaleError(f"labelled data not found: {path}")
    examples = []
    for number, record in jsonl_records(path):
        if (
            not isinstance(record, dict)
            or not isinstance(record.get("text"), str)
            or not isinstance(record.get("label"), str | int)
            or isinstance(record.get("label"), bool)
        ):
            raise LmscaleError(
                f"{path} line {number}: expected an object with a string 'text' and a string "
                "or integer 'label'"
            )
        examples.append(Example(record["text"], str(record["label"]), f"{path.name}:{number}"))
    if not examples:
        raise LmscaleError(f"{path} holds no examples")
    return examples


def load_labelled(spec: str, split: str, holdout: float = 0.1) -> list[Example]:
    """A split of `shakespeare-genre` or of a JSONL file.

    A JSONL file has no splits of its own: its examples are dealt, with a fixed seed, into
    `test` (a `holdout` share), `val` (another `holdout` share) and `train` (the rest).
    """
    if spec == SHAKESPEARE_GENRE:
        return shakespeare_genre(split)
    if split not in SPLITS:
        raise LmscaleError(f"unknown split '{split}' (choose from {', '.join(SPLITS)})")
    examples = read_labelled_jsonl(spec)
    order = list(range(len(examples)))
    random.Random(SPLIT_SEED).shuffle(order)
    n_held = max(1, round(holdout * len(examples)))
    if len(examples) < 3 * n_held:
        raise LmscaleError(f"{spec}: {len(examples)} examples are too few to split")
    chosen = {"test": order[:n_held], "val": order[n_held : 2 * n_held]}.get(
        split, order[2 * n_held :]
    )
    return [examples[i] for i in sorted(chosen)]


def label_counts(examples: list[Example]) -> Counter:
    """How many examples carry each label."""
    return Counter(example.label for example in examples)
