"""Classifier folders: the head, the labels, and as little of the backbone as its training changed.

    OUT/
        classifier.json     {"format", "labels", "pooling", "train", "base_model", "dtype",
                             "max_length", "base": {fingerprint} (head), "metrics": {...}}
        head.safetensors    "weight" (labels, dim), "bias" (labels,)
        model/              full: the fine-tuned backbone, a native model folder
        adapter/            lora: the adapter folder (`save_adapter`), which names its base

A head-only classifier stores no backbone at all: `base_model` names it, and a fingerprint of
two of its weights (as an adapter's) refuses a base that is not the one the head was fitted to.
A LoRA classifier is checked the same way by its adapter folder.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lmscale.checkpoint import load_pretrained, save_model_dir
from lmscale.config import to_dict
from lmscale.data.corpus import jsonl_records
from lmscale.errors import LmscaleError
from lmscale.finetune.adapter import fingerprint, load_adapter, save_adapter
from lmscale.finetune.classify import SequenceClassifier
from lmscale.finetune.lora import LoRAConfig

CONFIG = "classifier.json"
HEAD = "head.safetensors"
MODEL_DIR = "model"
ADAPTER_DIR = "adapter"
FORMAT = "lmscale-classifier-1"


def base_reference(source: str | Path) -> str:
    """How classifier.json names a base: an existing path made absolute, else the name as given."""
    path = Path(source)
    return str(path.resolve()) if path.exists() else str(source)


def save_classifier(
    classifier: SequenceClassifier, tokenizer, out: str | Path, *, labels: list[str],
    train: str, base_model: str, max_length: int, dtype: str | None,
    lora: LoRAConfig | None = None, extra: dict | None = None,
) -> Path:  # fmt: skip
    """Write `classifier` to the new folder `out` (see the module docstring), atomically.

    Args:
        classifier: the trained classifier.
        tokenizer: its backbone's tokenizer (saved with a full backbone).
        out: the folder to create; an existing one is refused.
        labels: label names, in head-row order.
        train: full, head or lora: decides what of the backbone is saved.
        base_model: the model the backbone was loaded from (`base_reference` of it).
        max_length: tokens per passage the classifier was trained on.
        dtype: the dtype the backbone was loaded in (None: as saved).
        lora: the adapter's config (lora only).
        extra: more JSON-able fields for classifier.json (metrics, settings).

    Returns:
        The folder.
    """
    out = Path(out)
    if out.exists():
        raise LmscaleError(f"{out} already exists: choose a new --out")
    if len(labels) != classifier.head.out_features:
        raise LmscaleError(f"{len(labels)} labels for a head of {classifier.head.out_features}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        backbone = classifier.backbone
        record = {
            "format": FORMAT, "labels": list(labels), "pooling": classifier.pooling,
            "train": train, "base_model": base_model, "dtype": dtype, "max_length": max_length,
        }  # fmt: skip
        if train == "full":
            config = {"model": to_dict(backbone.config), "tokenizer": tokenizer.settings}
            save_model_dir(tmp / MODEL_DIR, backbone.state_dict(), config, tokenizer.to_json())
        elif train == "lora":
            if lora is None:
                raise LmscaleError("a LoRA classifier needs its LoRAConfig to be saved")
            save_adapter(backbone, tmp / ADAPTER_DIR, lora, extra={"base_model": base_model})
        else:
            record["base"] = fingerprint(backbone, _hashed_layers(backbone))
        head = {
            k: v.detach().float().contiguous().cpu()
            for k, v in classifier.head.state_dict().items()
        }
        save_file(head, str(tmp / HEAD), {"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(record | (extra or {}), indent=2) + "\n")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_classifier_config(directory: str | Path) -> dict:
    """classifier.json of a classifier folder, checked for the fields loading needs."""
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise LmscaleError(f"{directory} is not a classifier folder: {CONFIG} not found")
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise LmscaleError(f"{path} is not valid JSON: {error}") from None
    needed = ("labels", "pooling", "train", "base_model", "max_length")
    missing = [key for key in needed if key not in record]
    if missing or record.get("format") != FORMAT:
        raise LmscaleError(f"{path} is not an lmscale classifier config (missing {missing})")
    return record


def load_classifier(directory: str | Path, device: str | torch.device = "cpu"):
    """A classifier folder back as `(SequenceClassifier, tokenizer, labels)`, in eval mode.

    Raises:
        LmscaleError: not a classifier folder, its base model is missing, or (head, lora) the
            base found under `base_model` is not the one the classifier was trained on.
    """
    directory = Path(directory)
    record = read_classifier_config(directory)
    dtype = record.get("dtype")
    if record["train"] == "full":
        backbone, tokenizer = load_pretrained(directory / MODEL_DIR, device, dtype)
    else:
        backbone, tokenizer = load_pretrained(record["base_model"], device, dtype)
        if record["train"] == "lora":
            load_adapter(backbone, directory / ADAPTER_DIR)
        else:
            _check_base(backbone, record, directory)
    labels = list(record["labels"])
    classifier = SequenceClassifier(backbone, len(labels), record["pooling"])
    state = load_file(str(directory / HEAD))
    if set(state) != {"weight", "bias"} or state["weight"].shape != classifier.head.weight.shape:
        raise LmscaleError(f"{directory / HEAD} does not fit {len(labels)} labels on this backbone")
    classifier.head.load_state_dict(state)
    classifier.to(device).requires_grad_(False)
    return classifier.eval(), tokenizer, labels


def _hashed_layers(backbone: nn.Module) -> list[str]:
    """The first and last linear layers of the blocks: what a head-only fingerprint hashes."""
    names = [n for n, m in backbone.named_modules() if isinstance(m, nn.Linear) and "." in n]
    if not names:
        raise LmscaleError("the backbone has no linear layers to fingerprint")
    return [names[0], names[-1]]


def _check_base(backbone: nn.Module, record: dict, directory: Path) -> None:
    saved = record.get("base")
    if not saved:
        raise LmscaleError(f"{directory / CONFIG} holds no fingerprint of its base model")
    current = fingerprint(backbone, saved["hashed"])
    if current["model"] != saved["model"] or current["sha256"] != saved["sha256"]:
        raise LmscaleError(
            f"classifier {directory} was trained on another base model than the one now at "
            f"{record['base_model']}"
        )


def read_texts(path: str | Path) -> tuple[list[str], list[str] | None]:
    """Texts of a JSONL file of {"text"} or {"text", "label"} lines, and the labels if all have one."""
    path = Path(path)
    if not path.is_file():
        raise LmscaleError(f"file not found: {path}")
    texts, labels = [], []
    for number, record in jsonl_records(path):
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise LmscaleError(f"{path} line {number}: expected an object with a string 'text'")
        texts.append(record["text"])
        label = record.get("label")
        labels.append(None if label is None or isinstance(label, bool) else str(label))
    if not texts:
        raise LmscaleError(f"{path} holds no texts")
    return texts, (labels if all(label is not None for label in labels) else None)


def classify_texts(
    directory: str | Path, texts: list[str], gold: list[str] | None = None, batch_size: int = 8
) -> dict:
    """Label `texts` with the classifier saved in `directory`; score them if `gold` is given.

    Returns:
        {"predictions": [{"text", "label", "probabilities": {label: p}}], and with `gold`
        "accuracy", "macro_f1", "examples" and "per_label_f1"}.
    """
    from lmscale.finetune.classify import encode, metrics, per_label_f1, probabilities

    classifier, tokenizer, labels = load_classifier(directory)
    max_length = read_classifier_config(directory)["max_length"]
    # Labels are checked before any work: one never seen in training cannot be scored.
    data = encode(tokenizer, texts, gold or [labels[0]] * len(texts), labels, max_length)
    probs = probabilities(classifier, data, batch_size, tokenizer.pad_id or 0)
    predicted = probs.argmax(-1).tolist()
    rows = [
        {"text": text, "label": labels[index], "probabilities": dict(zip(labels, p, strict=True))}
        for text, index, p in zip(texts, predicted, probs.tolist(), strict=True)
    ]
    result: dict = {"predictions": rows}
    if gold is not None:
        result |= metrics(predicted, data.labels).as_dict()
        result["per_label_f1"] = per_label_f1(predicted, data.labels, labels)
    return result
