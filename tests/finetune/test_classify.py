"""Classification: the bundled genre set split by play, pooling, metrics, training that learns."""

import random

import pytest
import torch

from lmscale.data.labelled import (
    genre_splits,
    label_counts,
    load_labelled,
    passages,
    read_labelled_jsonl,
    shakespeare_genre,
)
from lmscale.errors import LmscaleError
from lmscale.finetune.classify import (
    ClassifyConfig,
    Encoded,
    SequenceClassifier,
    batches,
    encode,
    majority_baseline,
    metrics,
    predict,
    train_classifier,
)
from lmscale.model import PRESETS, ModelConfig, Transformer
from lmscale.tokenizer import Tokenizer

GENRES = ["comedies", "histories", "problems", "roman", "romances", "tragedies"]


def test_genre_splits_are_by_play_and_cover_every_genre_in_every_split():
    splits = genre_splits()
    plays = [play for names in splits.values() for play in names]
    assert len(plays) == len(set(plays)) == 38
    for names in splits.values():
        assert sorted({play.split("/")[0] for play in names}) == GENRES
    assert len(splits["test"]) == len(splits["val"]) == 6
    assert genre_splits() == splits  # fixed seed


def test_passages_never_name_their_play_and_labels_are_genre_folders():
    test = shakespeare_genre("test")
    assert sorted(label_counts(test)) == GENRES
    assert all(example.source.split("/")[0] == example.label for example in test)
    macbeth = [example for example in test if example.source == "tragedies/macbeth"]
    if macbeth:
        assert not any(example.text.startswith("# ") for example in macbeth)
    words = [len(example.text.split()) for example in test]
    assert min(words) >= 75 and sorted(words)[len(words) // 2] >= 150


def test_passages_keep_whole_lines_and_drop_a_short_tail():
    text = "# Title\n" + "\n".join(f"w{i} x y" for i in range(10))  # 3 words a line
    cut = passages(text, 6)
    assert cut == ["w0 x y\nw1 x y", "w2 x y\nw3 x y", "w4 x y\nw5 x y", "w6 x y\nw7 x y",
                   "w8 x y\nw9 x y"]  # fmt: skip
    assert passages("a b c d e f g", 6) == ["a b c d e f g"]
    assert passages("a b", 6) == []


def test_jsonl_labels_split_deterministically(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [f'{{"text": "example {i}", "label": {i % 3}}}' for i in range(40)]
    path.write_text("\n".join(rows) + "\n")
    train, val, test = (load_labelled(str(path), split) for split in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (32, 4, 4)
    sources = [e.source for e in train + val + test]
    assert len(set(sources)) == 40 and load_labelled(str(path), "test") == test
    assert {e.label for e in train} == {"0", "1", "2"}


@pytest.mark.parametrize(
    "line, message",
    [("not json", "line 1: not valid JSON"), ('{"text": "a"}', "line 1: expected an object"),
     ('{"text": "a", "label": true}', "line 1: expected an object")],
)  # fmt: skip
def test_bad_jsonl_is_a_one_line_error(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(LmscaleError, match=message):
        read_labelled_jsonl(path)


def test_metrics_and_the_majority_baseline():
    scored = metrics([0, 0, 1, 2], [0, 1, 1, 2])
    assert scored.accuracy == 0.75
    # F1: label 0 = 2/3, label 1 = 2/3, label 2 = 1
    assert scored.macro_f1 == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    baseline = majority_baseline([1, 1, 0], [0, 1, 1, 2])
    assert baseline.accuracy == 0.5 and baseline.macro_f1 == pytest.approx((2 / 3) / 3)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    tokenizer = Tokenizer.train(["to be or not to be that is the question"] * 5, 300)
    config = ModelConfig(**PRESETS["tiny"] | {"vocab_size": tokenizer.vocab_size})
    return Transformer(config), tokenizer


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_right_padding_does_not_change_a_passage_s_logits(tiny, pooling):
    model, _ = tiny
    classifier = SequenceClassifier(model, 3, pooling).eval()
    short, long = [5, 6, 7], [8, 9, 10, 11, 12, 13]
    data = type("E", (), {"ids": [short, long], "labels": [0, 1]})
    tokens, lengths, _ = next(batches(data, 2, pad_id=2))
    with torch.no_grad():
        together = classifier(tokens, lengths)
        alone = classifier(torch.tensor([short]), torch.tensor([3]))
    assert tokens.shape == (2, 6) and torch.allclose(together[0], alone[0], atol=1e-5)


def test_unknown_labels_and_bad_settings_are_refused(tiny):
    model, tokenizer = tiny
    with pytest.raises(LmscaleError, match="label 'x' was not seen in training"):
        encode(tokenizer, ["a"], ["x"], ["a", "b"], 16)
    with pytest.raises(LmscaleError, match="unknown pooling"):
        ClassifyConfig(pooling="max")
    with pytest.raises(LmscaleError, match="unknown training mode"):
        ClassifyConfig(train="half")
    with pytest.raises(LmscaleError, match="at least 2 labels"):
        SequenceClassifier(model, 1)


def test_a_probe_s_validation_score_is_what_the_folded_classifier_predicts(tiny):
    """The probe scores validation on cached features; the saved head must predict the same."""
    model, _ = tiny
    rng, vocab = random.Random(0), model.config.vocab_size
    data = [
        Encoded([[rng.randrange(3, vocab) for _ in range(rng.randrange(4, 12))] for _ in range(n)],
                [i % 3 for i in range(n)])
        for n in (24, 12)
    ]  # fmt: skip
    classifier = SequenceClassifier(model, 3, "mean")
    settings = ClassifyConfig(train="head", pooling="mean", head_epochs=30, head_lr=1e-2)
    scored = train_classifier(classifier, *data, settings, pad_id=2, log=lambda _: None)
    predicted = predict(classifier, data[1], settings.batch_size, pad_id=2)
    assert scored == metrics(predicted, data[1].labels)


def _genre_sample(split: str, per_genre: int) -> list:
    by_genre: dict[str, list] = {}
    for example in shakespeare_genre(split):
        by_genre.setdefault(example.label, []).append(example)
    rng = random.Random(0)
    return [e for genre in GENRES for e in rng.sample(by_genre[genre], per_genre)]


def test_a_probe_on_smollm2_beats_the_majority_baseline_on_unseen_plays():
    """Features of the frozen pretrained model, a linear head; test plays never seen in training."""
    from lmscale.checkpoint import load_pretrained

    model, tokenizer = load_pretrained("smollm2-135m-instruct", dtype="bfloat16")
    train, val, test = (
        _genre_sample("train", 24),
        _genre_sample("val", 10),
        _genre_sample("test", 15),
    )
    settings = ClassifyConfig(train="head", pooling="mean", max_length=96, head_epochs=200,
                              head_lr=1e-2)  # fmt: skip
    as_data = [encode(tokenizer, [e.text for e in s], [e.label for e in s], GENRES, 96)
               for s in (train, val, test)]  # fmt: skip
    classifier = SequenceClassifier(model, len(GENRES), "mean")
    train_classifier(classifier, as_data[0], as_data[1], settings, pad_id=0, log=lambda _: None)
    assert not any(p.requires_grad for p in classifier.backbone.parameters())
    scored = metrics(predict(classifier, as_data[2], 16, pad_id=0), as_data[2].labels)
    baseline = majority_baseline(as_data[0].labels, as_data[2].labels)
    assert baseline.accuracy == pytest.approx(1 / 6)  # balanced sample
    assert scored.accuracy > baseline.accuracy + 0.1 and scored.macro_f1 > baseline.macro_f1 + 0.1
