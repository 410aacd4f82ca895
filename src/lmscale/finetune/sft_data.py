"""Chat data for supervised fine-tuning: JSONL conversations -> packed (inputs, targets) rows.

Each line of the file is `{"messages": [{"role": ..., "content": ...}, ...]}`. A conversation is
rendered with the model's own chat template and the loss falls on the assistant's tokens only:
its reply and the end-of-turn token that closes it (so the model learns to stop), never the
system or user text nor the template's headers. With ChatML (SmolLM2):

    <|im_start|>user\\nWho speaks ...?<|im_end|>\\n<|im_start|>assistant\\nHAMLET<|im_end|>\\n
    \\_________________________ not scored __________________________/\\___scored__/ \\not/

The rendered text is cut at those boundaries and each piece encoded on its own, so the mask is
exact whatever the tokenizer would merge across a boundary.

Packing: short examples are laid end to end into rows of up to `max_length` tokens (first fit,
in order), which wastes far less compute on padding than one example per row. NOTE: the
model has no document mask, so a packed example can attend to the examples before it in its
row (as in Hugging Face TRL's original packing); the loss still only scores assistant tokens,
and every example starts with its own template header, so the leak mostly costs a little signal.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from lmscale.errors import LmscaleError
from lmscale.tokenizer import END_OF_TURN_TOKENS, Tokenizer
from lmscale.train.loss import IGNORE_INDEX

Messages = list[dict[str, str]]


def read_chat_jsonl(path: str | Path) -> list[Messages]:
    """The conversations of a JSONL file of `{"messages": [{"role", "content"}, ...]}` lines.

    Raises:
        LmscaleError: naming the file and line of the first malformed record.
    """
    path = Path(path)
    if not path.is_file():
        raise LmscaleError(f"chat data not found: {path}")
    conversations = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            conversations.append(_parse_line(line, f"{path} line {number}"))
    if not conversations:
        raise LmscaleError(f"{path} holds no conversations")
    return conversations


def _parse_line(line: str, where: str) -> Messages:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise LmscaleError(f"{where}: not valid JSON ({error.msg})") from None
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not messages:
        raise LmscaleError(f'{where}: expected {{"messages": [{{"role": ..., "content": ...}}]}}')
    for i, message in enumerate(messages):
        ok = isinstance(message, dict) and all(
            isinstance(message.get(key), str) for key in ("role", "content")
        )
        if not ok:
            raise LmscaleError(f"{where}: message {i} needs string 'role' and 'content' fields")
    if not any(m["role"] == "assistant" for m in messages):
        raise LmscaleError(f"{where}: no assistant message to learn from")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def render_example(tokenizer: Tokenizer, messages: Messages) -> tuple[list[int], list[bool]]:
    """Token ids of a rendered conversation, and which of them are the assistant's.

    Returns:
        (ids, scored): scored[i] is True for assistant reply tokens and their end-of-turn token.
    """
    pieces: list[tuple[str, bool]] = []  # (text, scored), concatenating to the rendered text
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise LmscaleError(
                "the chat template does not render conversations as growing prefixes, so the "
                "assistant's tokens cannot be told apart"
            )
        reply = full[len(prompt) :]
        cut = _end_of_reply(reply, message["content"], tokenizer)
        pieces += [(prompt[len(done) :], False), (reply[:cut], True), (reply[cut:], False)]
        done = full
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    pieces.append((text[len(done) :], False))
    ids: list[int] = []
    scored: list[bool] = []
    for piece, is_scored in pieces:
        piece_ids = tokenizer.encode(piece, add_bos=False) if piece else []
        ids += piece_ids
        scored += [is_scored] * len(piece_ids)
    return ids, scored


def _end_of_reply(reply: str, content: str, tokenizer: Tokenizer) -> int:
    """Where the scored part of a rendered reply ends: after the marker that closes the turn."""
    start = max(reply.find(content), 0) + len(content)
    markers = [t for t in (*END_OF_TURN_TOKENS, tokenizer.eos_token) if t]
    found = [(reply.find(m, start), m) for m in markers if reply.find(m, start) >= 0]
    if not found:
        return len(reply)  # a template without an end marker: the whole reply is scored
    index, marker = min(found)
    return index + len(marker)


@dataclass
class Example:
    """One conversation as next-token pairs: inputs[i] predicts targets[i]."""

    inputs: list[int]
    targets: list[int]
    """IGNORE_INDEX where the next token is not the assistant's."""


def to_example(ids: list[int], scored: list[bool], max_length: int) -> Example:
    """Shift a rendered conversation into (inputs, targets), truncated to `max_length` pairs."""
    targets = [t if s else IGNORE_INDEX for t, s in zip(ids[1:], scored[1:], strict=True)]
    return Example(ids[:-1][:max_length], targets[:max_length])


def pack(examples: list[Example], max_length: int, packing: bool = True) -> list[Example]:
    """Lay examples end to end into rows of at most `max_length` (first fit, in order).

    Args:
        examples: each at most `max_length` long (see `to_example`).
        max_length: tokens per row.
        packing: False keeps one example per row.

    Returns:
        The rows; rows with no scored target are dropped.
    """
    rows: list[Example] = []
    for example in examples:
        if not any(t != IGNORE_INDEX for t in example.targets):
            continue  # truncation cut every assistant token away
        fits = packing and rows and len(rows[-1].inputs) + len(example.inputs) <= max_length
        if fits:
            rows[-1].inputs += example.inputs
            rows[-1].targets += example.targets
        else:
            rows.append(Example(list(example.inputs), list(example.targets)))
    return rows


def build_rows(
    tokenizer: Tokenizer, conversations: list[Messages], max_length: int, packing: bool = True
) -> list[Example]:
    """Render, mask, truncate and pack conversations into training rows."""
    if tokenizer.chat_template is None:
        raise LmscaleError("the model's tokenizer has no chat template to render the chat data")
    examples = [to_example(*render_example(tokenizer, m), max_length) for m in conversations]
    rows = pack(examples, max_length, packing)
    if not rows:
        raise LmscaleError(f"no example keeps an assistant token within --max-length {max_length}")
    return rows


class RowLoader:
    """Batches of rows in a seeded random order, reshuffled each pass, padded to the longest.

    On several data-parallel processes each builds the same global batch of `batch_size` rows
    (same seed, same order) and keeps only its own contiguous share, so together they train on
    exactly the batch one process would; shares differ by at most one row when the ranks do not
    divide the batch. Each share is padded to its own longest row: the padding's targets are
    IGNORE_INDEX and, being at the end of a row, it is never attended to, so the loss is unchanged.

    Args:
        rows: the packed rows.
        batch_size: rows per global batch.
        pad_id: the input id of padding (its targets are IGNORE_INDEX, so any id works).
        seed: seed of the order.
        rank, world_size: this process's data-parallel rank and their number.
    """

    def __init__(
        self, rows: list[Example], batch_size: int, pad_id: int = 0, seed: int = 0,
        rank: int = 0, world_size: int = 1,
    ):  # fmt: skip
        if min(batch_size, len(rows)) < world_size:
            raise LmscaleError(
                f"a step of {min(batch_size, len(rows))} rows (--batch-size {batch_size}, "
                f"{len(rows)} rows of data) cannot be shared by {world_size} processes"
            )
        self.rows, self.batch_size, self.pad_id = rows, batch_size, pad_id
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)
        self.order: list[int] = []

    def next_batch(self) -> tuple[Tensor, Tensor]:
        """(inputs, targets) of this rank's share, each (B, T) with T its longest row."""
        picked = []
        for _ in range(min(self.batch_size, len(self.rows))):
            if not self.order:
                self.order = torch.randperm(len(self.rows), generator=self.generator).tolist()
            picked.append(self.rows[self.order.pop()])
        n, world = len(picked), self.world_size
        picked = picked[n * self.rank // world : n * (self.rank + 1) // world]
        length = max(len(row.inputs) for row in picked)
        inputs = torch.full((len(picked), length), self.pad_id, dtype=torch.long)
        targets = torch.full((len(picked), length), IGNORE_INDEX, dtype=torch.long)
        for i, row in enumerate(picked):
            inputs[i, : len(row.inputs)] = torch.tensor(row.inputs)
            targets[i, : len(row.targets)] = torch.tensor(row.targets)
        return inputs, targets
