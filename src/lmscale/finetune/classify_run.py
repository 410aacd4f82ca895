"""`lmscale finetune classify`: load labelled data and a backbone, train, score on test, save.

Training uses `train`, the best state is chosen on `val`, and `test` is scored once at the end,
next to the majority-class baseline (see `lmscale.finetune.classify`). Every data problem
(unknown set, missing labels, a val or test label never seen in training) is found before the
model loads. `max_train` / `max_eval` draw a seeded, label-balanced subsample of each split for
quick runs; a label with fewer examples than its share keeps them all.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import torch

from lmscale.checkpoint import load_pretrained
from lmscale.data.labelled import SHAKESPEARE_GENRE, Example, label_counts, load_labelled
from lmscale.errors import LmscaleError
from lmscale.finetune.classify import (
    ClassifyConfig,
    Log,
    SequenceClassifier,
    encode,
    majority_baseline,
    metrics,
    per_label_f1,
    predict,
    train_classifier,
)
from lmscale.finetune.classify_io import base_reference, save_classifier
from lmscale.finetune.lora import LoRAConfig, apply_lora_


def balanced_sample(examples: list[Example], n: int | None, seed: int = 0) -> list[Example]:
    """At most `n` examples, dealt round-robin over the labels (each shuffled with `seed`).

    The result keeps the input's order; None or an `n` above the size returns all of them.
    """
    if n is None or n >= len(examples):
        return list(examples)
    if n < 1:
        raise LmscaleError(f"a sample size must be at least 1, got {n}")
    by_label: dict[str, list[int]] = defaultdict(list)
    for i, example in enumerate(examples):
        by_label[example.label].append(i)
    rng = random.Random(seed)
    queues = []
    for label in sorted(by_label):
        indices = by_label[label]
        rng.shuffle(indices)
        queues.append(indices)
    chosen: list[int] = []
    while len(chosen) < n:
        for queue in queues:
            if queue and len(chosen) < n:
                chosen.append(queue.pop())
    return [examples[i] for i in sorted(chosen)]


def load_splits(
    data: str, max_train: int | None = None, max_eval: int | None = None, seed: int = 0
) -> tuple[dict[str, list[Example]], list[str]]:
    """The train, val and test examples of `data` and the label names (sorted), all checked."""
    if data != SHAKESPEARE_GENRE and not Path(data).is_file():
        raise LmscaleError(
            f"unknown data '{data}': neither {SHAKESPEARE_GENRE} nor a JSONL file of "
            '{"text", "label"} lines'
        )
    splits = {split: load_labelled(data, split) for split in ("train", "val", "test")}
    splits["train"] = balanced_sample(splits["train"], max_train, seed)
    for split in ("val", "test"):
        splits[split] = balanced_sample(splits[split], max_eval, seed)
    labels = sorted(label_counts(splits["train"]))
    if len(labels) < 2:
        raise LmscaleError(f"{data}: the training split has {len(labels)} label; 2 are needed")
    for split in ("val", "test"):
        unseen = sorted(set(label_counts(splits[split])) - set(labels))
        if unseen:
            raise LmscaleError(
                f"{data}: {split} label '{unseen[0]}' was not seen in training "
                f"(training labels: {', '.join(labels)})"
            )
    return splits, labels


def finetune_classifier(
    model: str, data: str, out: str | Path, config: ClassifyConfig,
    lora: LoRAConfig | None = None, max_train: int | None = None, max_eval: int | None = None,
    dtype: str | None = None, log: Log = print,
) -> dict:  # fmt: skip
    """Train a classifier of `data` on the backbone `model`, score it on test, save it to `out`.

    Args:
        model: the backbone (anything `load_pretrained` accepts).
        data: `shakespeare-genre` or a JSONL file of {"text", "label"} lines.
        out: the classifier folder to create (see `classify_io`); an existing one is refused.
        config: training mode, pooling and optimisation settings.
        lora: the adapters' shape (lora mode; default rank 8 on q,k,v,o).
        max_train, max_eval: label-balanced subsample sizes of train and of val / test.
        dtype: load the backbone in this dtype (None: as saved).
        log: where progress lines go.

    Returns:
        The summary also written to classifier.json: split sizes, trainable parameters, and
        the val and test metrics with the test set's majority baseline and per-label F1.
    """
    if Path(out).exists():
        raise LmscaleError(f"{out} already exists: choose a new --out")
    splits, labels = load_splits(data, max_train, max_eval, config.seed)
    backbone, tokenizer = load_pretrained(model, dtype=dtype)
    torch.manual_seed(config.seed)
    if config.train == "lora":
        lora = lora or LoRAConfig()
        apply_lora_(backbone, lora)  # freezes all but the adapters
    classifier = SequenceClassifier(backbone, len(labels), config.pooling)
    classifier.head.requires_grad_(True)
    if config.train == "full":
        classifier.requires_grad_(True)
    encoded = {
        split: encode(tokenizer, [e.text for e in rows], [e.label for e in rows], labels,
                      config.max_length)
        for split, rows in splits.items()
    }  # fmt: skip
    pad_id = tokenizer.pad_id or 0
    log(
        f"{config.train} fine-tuning on {len(splits['train'])} examples of {len(labels)} labels "
        f"(val {len(splits['val'])}, test {len(splits['test'])})"
    )
    val = train_classifier(classifier, encoded["train"], encoded["val"], config, pad_id, log)
    trainable = sum(p.numel() for p in classifier.parameters() if p.requires_grad)
    if config.train == "head":
        trainable = sum(p.numel() for p in classifier.head.parameters())
    test = encoded["test"]
    predicted = predict(classifier, test, config.batch_size, pad_id)
    summary = {
        "labels": labels,
        "examples": {split: len(rows) for split, rows in splits.items()},
        "trainable_params": trainable,
        "total_params": sum(p.numel() for p in classifier.parameters()),
        "val": val.as_dict(),
        "test": metrics(predicted, test.labels).as_dict(),
        "baseline": majority_baseline(encoded["train"].labels, test.labels).as_dict(),
        "per_label_f1": per_label_f1(predicted, test.labels, labels),
    }
    extra = {"metrics": summary, "settings": asdict(config), "data": data}
    summary["out"] = str(save_classifier(
        classifier, tokenizer, out, labels=labels, train=config.train,
        base_model=base_reference(model), max_length=config.max_length, dtype=dtype, lora=lora,
        extra=extra,
    ))  # fmt: skip
    return summary
