"""Chat data: rendering with the template, assistant-only targets, packing, malformed input."""

import json

import pytest

from lmscale.errors import LmscaleError
from lmscale.finetune.sft_data import (
    RowLoader,
    build_rows,
    read_chat_jsonl,
    render_example,
    to_example,
)
from lmscale.train.loss import IGNORE_INDEX

CONVERSATION = [
    {"role": "system", "content": "Name the speaker."},
    {"role": "user", "content": 'In Hamlet, who says: "Who\'s there?"'},
    {"role": "assistant", "content": "BERNARDO"},
    {"role": "user", "content": 'And: "Long live the king!"'},
    {"role": "assistant", "content": "BERNARDO"},
]


def test_only_assistant_replies_and_their_end_token_are_scored(tiny_tokenizer):
    ids, scored = render_example(tiny_tokenizer, CONVERSATION)
    text = tiny_tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=False)
    assert tiny_tokenizer.decode(ids) == text  # the pieces concatenate to the whole rendering
    eos = tiny_tokenizer.eos_id
    # Walk the rendering token by token: scored exactly from each reply's first token through
    # the <|eos|> closing it; the headers, system, user text and newlines are not scored.
    spans, current = [], []
    for token, is_scored in zip(ids, scored, strict=True):
        if is_scored:
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    assert [tiny_tokenizer.decode(span) for span in spans] == ["BERNARDO<|eos|>"] * 2
    assert all(span[-1] == eos for span in spans)
    assert sum(scored) == sum(len(span) for span in spans)
    reply_header = tiny_tokenizer.encode("<|bos|>assistant\n")
    first_reply = ids.index(reply_header[0], 5)  # the third <|bos|>: system, user, assistant
    assert not any(scored[: first_reply + len(reply_header)])


def test_smollm2_template_scores_reply_and_im_end(smollm2):
    _, tokenizer = smollm2
    ids, scored = render_example(tokenizer, CONVERSATION[1:3])
    assert tokenizer.decode([t for t, s in zip(ids, scored, strict=True) if s]) == (
        "BERNARDO<|im_end|>"
    )
    example = to_example(ids, scored, max_length=1000)
    scored_targets = [t for t in example.targets if t != IGNORE_INDEX]
    assert tokenizer.decode(scored_targets) == "BERNARDO<|im_end|>"
    assert example.inputs == ids[:-1]


def test_packing_fills_rows_without_losing_targets(tiny_tokenizer):
    conversations = [CONVERSATION[1:3]] * 10
    one = to_example(*render_example(tiny_tokenizer, conversations[0]), max_length=64)
    rows = build_rows(tiny_tokenizer, conversations, max_length=3 * len(one.inputs))
    assert [len(r.inputs) for r in rows] == [3 * len(one.inputs)] * 3 + [len(one.inputs)]
    assert sum(t != IGNORE_INDEX for r in rows for t in r.targets) == 10 * sum(
        t != IGNORE_INDEX for t in one.targets
    )
    unpacked = build_rows(tiny_tokenizer, conversations, 3 * len(one.inputs), packing=False)
    assert len(unpacked) == 10
    inputs, targets = RowLoader(rows, batch_size=2).next_batch()
    assert inputs.shape == targets.shape and inputs.shape[1] <= 3 * len(one.inputs)


@pytest.mark.parametrize(
    "line, message",
    [("{not json", "line 2: not valid JSON"),
     ('{"text": "hi"}', 'line 2: expected {"messages"'),
     ('{"messages": [{"role": "user"}]}', "line 2: message 0 needs string"),
     ('{"messages": [{"role": "user", "content": "hi"}]}', "line 2: no assistant message")],
)  # fmt: skip
def test_malformed_lines_are_named_by_number(tmp_path, line, message):
    path = tmp_path / "chat.jsonl"
    good = json.dumps({"messages": CONVERSATION[1:3]})
    path.write_text(f"{good}\n{line}\n")
    with pytest.raises(LmscaleError, match=message.replace("[", r"\[").replace("{", r"\{")):
        read_chat_jsonl(path)
