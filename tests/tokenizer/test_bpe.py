"""Byte-level BPE: exact round trips on every play, special ids, save/load, bad files."""

import pytest

from lmscale.data import iter_documents
from lmscale.errors import LmscaleError
from lmscale.tokenizer import MIN_VOCAB_SIZE, Tokenizer


@pytest.fixture(scope="module")
def plays():
    return list(iter_documents("shakespeare"))


@pytest.fixture(scope="module")
def tokenizer(plays):
    return Tokenizer.train((play.text for play in plays), vocab_size=1024)


def test_every_play_round_trips(plays, tokenizer):
    assert len(plays) == 38
    encoded = tokenizer.encode_batch([play.text for play in plays])
    for play, ids in zip(plays, encoded, strict=True):
        assert tokenizer.decode(ids) == play.text, play.name


def test_batch_matches_single(tokenizer):
    texts = ["To be, or not to be", "  that is\nthe question:  "]
    assert tokenizer.encode_batch(texts) == [tokenizer.encode(t) for t in texts]


@pytest.mark.parametrize(
    "text",
    [
        "",
        " leading space",
        "trailing spaces   ",
        "\n\nnew\r\nlines\n",
        "tabs\tand ünïcödé 🙂 日本語",
        "<|eos|> literal specials <|pad|>",
    ],
)
def test_unicode_and_whitespace_round_trip(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_special_ids(tokenizer):
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (0, 1, 2)
    assert tokenizer.token_to_id("<|eos|>") == 1
    assert tokenizer.token_to_id("no such token here") is None
    assert tokenizer.vocab_size == 1024
    ids = [tokenizer.bos_id, *tokenizer.encode("hi"), tokenizer.eos_id]
    assert tokenizer.decode(ids) == "<|bos|>hi<|eos|>"
    assert tokenizer.decode(ids, skip_special_tokens=True) == "hi"


def test_encode_adds_no_specials(tokenizer):
    ids = tokenizer.encode("hello")
    assert not {0, 1, 2} & set(ids)


def test_save_load_round_trip(tokenizer, tmp_path):
    path = tmp_path / "tokenizer.json"
    tokenizer.save(path)
    loaded = Tokenizer.load(path)
    text = "Now is the winter of our discontent\n"
    assert loaded.encode(text) == tokenizer.encode(text)
    assert loaded.vocab_size == tokenizer.vocab_size
    assert Tokenizer.from_json(tokenizer.to_json()).encode(text) == tokenizer.encode(text)


def test_missing_file(tmp_path):
    with pytest.raises(LmscaleError, match="nope.json"):
        Tokenizer.load(tmp_path / "nope.json")


def test_corrupt_file(tokenizer, tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text(tokenizer.to_json()[:500])
    with pytest.raises(LmscaleError, match="corrupt tokenizer .*tokenizer.json"):
        Tokenizer.load(path)


def test_rejects_tiny_vocab():
    with pytest.raises(LmscaleError, match="vocab_size"):
        Tokenizer.train(["abc"], vocab_size=MIN_VOCAB_SIZE - 1)


def test_smallest_vocab_still_round_trips():
    tok = Tokenizer.train(["abc"], vocab_size=MIN_VOCAB_SIZE)
    assert tok.decode(tok.encode("xyz é")) == "xyz é"
