"""prepare(): split by document, tokenizer on train only, shards that verify and decode back."""

import json

import numpy as np
import pytest

from lmscale.data import Manifest, iter_documents, prepare, split_documents, token_dtype
from lmscale.data.corpus import Document
from lmscale.errors import LmscaleError
from lmscale.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory):
    out = tmp_path_factory.mktemp("shakespeare")
    return out, prepare("shakespeare", out, vocab_size=1024)


def _split_tokens(out, manifest, split):
    dtype = np.dtype(manifest.dtype)
    return np.concatenate(
        [np.fromfile(out / s.file, dtype=dtype) for s in manifest.splits[split].shards]
    )


def test_manifest_contents(shakespeare):
    out, manifest = shakespeare
    data = json.loads((out / "manifest.json").read_text())
    assert data["format_version"] == 1
    assert data["corpus"] == "shakespeare"
    assert data["tokenizer"] == "tokenizer.json"
    assert (data["vocab_size"], data["dtype"], data["eos_id"]) == (1024, "uint16", 1)
    for split in ("train", "val"):
        info = data["splits"][split]
        assert info["tokens"] == sum(s["tokens"] for s in info["shards"]) > 0
        assert info["shards"][0]["file"] == f"{split}_000.bin"
        assert len(info["shards"][0]["sha256"]) == 64
    assert Manifest.load(out) == manifest


def test_split_by_play(shakespeare):
    _, manifest = shakespeare
    train, val = (set(manifest.splits[s].documents) for s in ("train", "val"))
    assert not train & val
    assert len(train) + len(val) == 38
    assert len(val) == 4  # round(38 * 0.1)
    assert "tragedies/hamlet" in train | val


def test_tokens_decode_to_plays(shakespeare):
    out, manifest = shakespeare
    tokenizer = Tokenizer.load(out / "tokenizer.json")
    texts = {doc.name: doc.text for doc in iter_documents("shakespeare")}
    tokens = _split_tokens(out, manifest, "val")
    assert tokens.dtype == np.uint16
    assert len(tokens) == manifest.splits["val"].tokens
    docs = np.split(tokens, np.flatnonzero(tokens == manifest.eos_id)[:-1] + 1)
    assert len(docs) == len(manifest.splits["val"].documents)
    for name, ids in zip(manifest.splits["val"].documents, docs, strict=True):
        assert ids[-1] == manifest.eos_id
        assert tokenizer.decode(ids[:-1].tolist()) == texts[name]


def test_split_is_deterministic():
    docs = [Document(str(i), "x") for i in range(10)]
    first = split_documents(docs, 0.3, seed=1)
    assert first == split_documents(docs, 0.3, seed=1)
    assert len(first["val"]) == 3 and len(first["train"]) == 7
    assert split_documents(docs[:2], 0.01, seed=0)["val"]  # at least one val document


def test_dtype_choice():
    assert token_dtype(1024) == np.uint16
    assert token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32
    assert token_dtype(100_000) == np.uint32


def test_single_text_file_splits_at_a_line(tmp_path):
    lines = [f"line number {i} of the only document\n" for i in range(200)]
    (tmp_path / "one.txt").write_text("".join(lines))
    manifest = prepare(str(tmp_path / "one.txt"), tmp_path / "out", vocab_size=300)
    train, val = manifest.splits["train"], manifest.splits["val"]
    assert train.documents[0].startswith("one.txt[:") and val.documents[0].startswith("one.txt[")
    cut = int(train.documents[0].split(":")[1].rstrip("]"))
    assert "".join(lines)[cut - 1] == "\n"
    assert 0.85 < cut / len("".join(lines)) < 0.95


def test_folder_and_small_shards(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    for i in range(5):
        (corpus / f"doc{i}.txt").write_text(f"document {i} " * 50)
    (corpus / "sub" / "notes.md").write_text("# notes\n" * 20)
    (corpus / "ignored.bin").write_bytes(b"\x00\x01")
    manifest = prepare(str(corpus), tmp_path / "out", vocab_size=300, shard_tokens=100)
    names = manifest.splits["train"].documents + manifest.splits["val"].documents
    assert sorted(names) == [
        "doc0.txt",
        "doc1.txt",
        "doc2.txt",
        "doc3.txt",
        "doc4.txt",
        "sub/notes.md",
    ]
    shards = manifest.splits["train"].shards
    assert len(shards) > 1 and all(s.tokens == 100 for s in shards[:-1])
    Manifest.load(tmp_path / "out")


def test_jsonl(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"story {i}\n"}) for i in range(10)) + "\n")
    manifest = prepare(str(path), tmp_path / "out", vocab_size=300)
    assert len(manifest.splits["val"].documents) == 1
    assert manifest.splits["val"].documents[0].startswith("docs.jsonl:")


def test_bad_jsonl_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(LmscaleError, match=r"docs.jsonl line 2"):
        prepare(str(path), tmp_path / "out", vocab_size=300)
    path.write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(LmscaleError, match=r"docs.jsonl line 2"):
        list(iter_documents(path))


def test_unknown_corpus(tmp_path):
    with pytest.raises(LmscaleError, match="unknown corpus"):
        prepare(str(tmp_path / "missing"), tmp_path / "out")
    assert not (tmp_path / "out").exists()  # no folder is made for a corpus that is not there


def test_a_bad_corpus_leaves_an_earlier_preparation_whole(small_prepared, tmp_path):
    before = Manifest.load(small_prepared)
    files = {path.name: path.read_bytes() for path in small_prepared.iterdir()}
    with pytest.raises(LmscaleError, match="unknown corpus"):
        prepare(str(tmp_path / "missing"), small_prepared)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LmscaleError, match="has no .txt/.md files"):
        prepare(str(empty), small_prepared)
    assert {path.name: path.read_bytes() for path in small_prepared.iterdir()} == files
    assert Manifest.load(small_prepared) == before


def test_bad_options(tmp_path):
    with pytest.raises(LmscaleError, match="val_fraction"):
        prepare("shakespeare", tmp_path, val_fraction=1.0)
    with pytest.raises(LmscaleError, match="shard_tokens"):
        prepare("shakespeare", tmp_path, shard_tokens=0)


@pytest.fixture
def small_prepared(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"{i}.txt").write_text(f"text {i} " * 30)
    out = tmp_path / "out"
    prepare(str(corpus), out, vocab_size=300)
    return out


def test_missing_shard(small_prepared):
    (small_prepared / "train_000.bin").unlink()
    with pytest.raises(LmscaleError, match=r"missing shard .*train_000\.bin"):
        Manifest.load(small_prepared)


def test_corrupt_shard(small_prepared):
    path = small_prepared / "train_000.bin"
    data = bytearray(path.read_bytes())
    data[3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(LmscaleError, match=r"corrupt shard .*train_000\.bin: sha256 mismatch"):
        Manifest.load(small_prepared)
    Manifest.load(small_prepared, verify=False)  # opt-out still reads the manifest


def test_truncated_shard(small_prepared):
    path = small_prepared / "val_000.bin"
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(LmscaleError, match=r"corrupt shard .*val_000\.bin: .*bytes"):
        Manifest.load(small_prepared)


def test_missing_or_corrupt_manifest(small_prepared):
    manifest = small_prepared / "manifest.json"
    manifest.write_text("{not json")
    with pytest.raises(LmscaleError, match="corrupt manifest"):
        Manifest.load(small_prepared)
    manifest.unlink()
    with pytest.raises(LmscaleError, match="no manifest.json"):
        Manifest.load(small_prepared)


def test_loads_into_loader(shakespeare):
    from lmscale.data import Loader, TokenDataset

    out, manifest = shakespeare
    dataset = TokenDataset(out, "train")
    assert len(dataset) == manifest.splits["train"].tokens
    assert dataset.tokenizer_path == out / "tokenizer.json"
    inputs, targets = Loader(dataset, batch_size=2, context=32).next_batch()
    assert inputs.shape == (2, 32) and int(inputs.max()) < manifest.vocab_size
