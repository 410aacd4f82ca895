"""Sequence classification on a language-model backbone: a pooled hidden state, a linear head.

    tokens (B, T), right-padded -> backbone.hidden_states -> (B, T, dim)
        -> pool: the last real token ("last") or the mean over real tokens ("mean") -> (B, dim)
        -> head: Linear(dim, labels) -> logits (B, labels)

Right padding is exact for a causal model: a real token never attends to the pads after it, so
its hidden state is the one it has unpadded. "last" is what decoder-only classifiers usually use
(the last token has read the whole passage); "mean" is steadier when the backbone stays frozen.

Three ways to train (`ClassifyConfig.train`):
    full   every backbone weight and the head train (AdamW, warm-up + cosine).
    head   the backbone is frozen and run once: pooled features are cached and only the head
           trains on them, for many epochs at almost no cost (a linear probe).
    lora   the backbone is frozen under LoRA adapters (`lmscale.finetune.lora`); adapters and
           head train.

The metrics are accuracy and macro-F1 (the unweighted mean of each label's F1 over the labels
present in the evaluated set), always next to the majority-class baseline: the label most common
in training, predicted for everything.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmscale.errors import LmscaleError
from lmscale.model import Transformer
from lmscale.train.optim import lr_at

POOLINGS = ("last", "mean")
TRAIN_MODES = ("full", "head", "lora")


@dataclass
class ClassifyConfig:
    """How to fine-tune a classifier."""

    train: str = "full"
    """full, head (frozen backbone, linear probe) or lora."""
    pooling: str = "last"
    """last (the last real token's hidden state) or mean (over real tokens)."""
    max_length: int = 256
    """Tokens per passage; longer ones are cut (their start is kept)."""
    batch_size: int = 8
    steps: int = 200
    """Optimizer steps (full, lora); a head-only probe runs `head_epochs` over cached features."""
    head_epochs: int = 100
    lr: float = 5e-5
    """Peak learning rate of the backbone (full) or the adapters (lora)."""
    head_lr: float = 1e-3
    warmup_steps: int = 20
    weight_decay: float = 0.0
    eval_every: int = 50
    """Steps between validation runs (full, lora); the best validation state is kept."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.train not in TRAIN_MODES:
            raise LmscaleError(
                f"unknown training mode '{self.train}' (choose from full, head, lora)"
            )
        if self.pooling not in POOLINGS:
            raise LmscaleError(f"unknown pooling '{self.pooling}' (choose from last, mean)")
        for name in ("max_length", "batch_size", "steps", "head_epochs", "eval_every"):
            if getattr(self, name) < 1:
                raise LmscaleError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.head_lr <= 0:
            raise LmscaleError("learning rates must be positive")


class SequenceClassifier(nn.Module):
    """A backbone `Transformer` and a linear head over its pooled final hidden states."""

    def __init__(self, backbone: Transformer, num_labels: int, pooling: str = "last") -> None:
        super().__init__()
        if num_labels < 2:
            raise LmscaleError(f"a classifier needs at least 2 labels, got {num_labels}")
        if pooling not in POOLINGS:
            raise LmscaleError(f"unknown pooling '{pooling}' (choose from last, mean)")
        self.backbone, self.pooling = backbone, pooling
        self.head = nn.Linear(backbone.config.dim, num_labels)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def pooled(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        """(B, T) right-padded ids and (B,) real lengths -> (B, dim) pooled hidden states."""
        hidden = self.backbone.hidden_states(tokens)  # (B, T, dim)
        if self.pooling == "last":
            return hidden[torch.arange(len(tokens), device=tokens.device), lengths - 1]
        mask = torch.arange(tokens.shape[1], device=tokens.device)[None] < lengths[:, None]
        mask = mask.to(hidden.dtype)[..., None]  # (B, T, 1)
        return (hidden * mask).sum(1) / lengths[:, None].to(hidden.dtype)

    def forward(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        """Logits (B, labels)."""
        pooled = self.pooled(tokens, lengths)
        return self.head(pooled.to(self.head.weight.dtype))


@dataclass
class Encoded:
    """Passages as token ids and label indices."""

    ids: list[list[int]]
    labels: list[int]


def encode(
    tokenizer, texts: Sequence[str], labels: Sequence[str], label_names: Sequence[str],
    max_length: int,
) -> Encoded:  # fmt: skip
    """Tokenize and cut each passage to `max_length`; labels become indices into `label_names`."""
    index = {name: i for i, name in enumerate(label_names)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise LmscaleError(
            f"label '{unknown[0]}' was not seen in training (labels: {', '.join(label_names)})"
        )
    ids = [row[:max_length] or [0] for row in tokenizer.encode_batch(list(texts))]
    return Encoded(ids, [index[label] for label in labels])


def batches(
    data: Encoded, batch_size: int, pad_id: int, order: Sequence[int] | None = None
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """(tokens (B, T) right-padded, lengths (B,), labels (B,)) batches in `order` (default: as is)."""
    order = list(range(len(data.ids))) if order is None else list(order)
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        rows = [data.ids[i] for i in chosen]
        width = max(len(row) for row in rows)
        tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
        for i, row in enumerate(rows):
            tokens[i, : len(row)] = torch.tensor(row)
        lengths = torch.tensor([len(row) for row in rows])
        yield tokens, lengths, torch.tensor([data.labels[i] for i in chosen])


@dataclass
class Metrics:
    """Classification quality on one set."""

    accuracy: float
    macro_f1: float
    examples: int

    def as_dict(self) -> dict:
        return asdict(self)


def metrics(predicted: Sequence[int], actual: Sequence[int]) -> Metrics:
    """Accuracy and macro-F1 (over the labels present in `actual`)."""
    if not actual:
        raise LmscaleError("no examples to score")
    pairs = list(zip(predicted, actual, strict=True))
    accuracy = sum(p == a for p, a in pairs) / len(pairs)
    f1s = []
    for label in sorted(set(actual)):
        tp = sum(p == label and a == label for p, a in pairs)
        fp = sum(p == label and a != label for p, a in pairs)
        fn = sum(p != label and a == label for p, a in pairs)
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return Metrics(accuracy, sum(f1s) / len(f1s), len(pairs))


def per_label_f1(
    predicted: Sequence[int], actual: Sequence[int], label_names: Sequence[str]
) -> dict[str, float]:
    """Each label's F1 (the labels present in `actual`, by name): what macro-F1 averages."""
    pairs = list(zip(predicted, actual, strict=True))
    out = {}
    for label in sorted(set(actual)):
        tp = sum(p == label and a == label for p, a in pairs)
        wrong = sum((p == label) != (a == label) for p, a in pairs)
        out[label_names[label]] = 2 * tp / (2 * tp + wrong)
    return out


def majority_baseline(train_labels: Sequence[int], actual: Sequence[int]) -> Metrics:
    """The score of always predicting the label most common in training."""
    majority = Counter(train_labels).most_common(1)[0][0]
    return metrics([majority] * len(actual), actual)


@torch.no_grad()
def predict(model: SequenceClassifier, data: Encoded, batch_size: int, pad_id: int) -> list[int]:
    """The argmax label index of every passage."""
    was_training = model.training
    model.eval()
    out = []
    for tokens, lengths, _ in batches(data, batch_size, pad_id):
        out += model(tokens, lengths).argmax(-1).tolist()
    model.train(was_training)
    return out


@torch.no_grad()
def probabilities(model: SequenceClassifier, data: Encoded, batch_size: int, pad_id: int) -> Tensor:
    """(N, labels) float32 softmax probabilities of every passage."""
    was_training = model.training
    model.eval()
    rows = [model(t, n).float().softmax(-1) for t, n, _ in batches(data, batch_size, pad_id)]
    model.train(was_training)
    return torch.cat(rows)


Log = Callable[[str], None]


def train_classifier(
    model: SequenceClassifier, train: Encoded, val: Encoded, config: ClassifyConfig, pad_id: int,
    log: Log = print,
) -> Metrics:  # fmt: skip
    """Fine-tune `model` in place as `config` says; return its final validation metrics.

    For full and lora training the parameters with the best validation accuracy seen at an
    evaluation (every `eval_every` steps and at the end) are restored at the end. The backbone's
    trainable parameters are the ones with `requires_grad` set when this is called (for lora:
    only the adapters); for `head` the backbone is frozen here.
    """
    torch.manual_seed(config.seed)
    if config.train == "head":
        return _train_head(model, train, val, config, pad_id, log)
    head = set(model.head.parameters())
    backbone = [p for p in model.backbone.parameters() if p.requires_grad and p not in head]
    if not backbone:
        raise LmscaleError(f"'{config.train}' training found no trainable backbone parameters")
    optimizer = torch.optim.AdamW(
        [
            {"params": backbone, "lr": config.lr, "weight_decay": config.weight_decay},
            {"params": list(head), "lr": config.head_lr, "weight_decay": 0.0},
        ]
    )
    peaks = [config.lr, config.head_lr]
    rng = random.Random(config.seed)
    best = (-1.0, None)
    step = 0
    model.train()
    while step < config.steps:
        order = list(range(len(train.ids)))
        rng.shuffle(order)
        for tokens, lengths, labels in batches(train, config.batch_size, pad_id, order):
            for group, peak in zip(optimizer.param_groups, peaks, strict=True):
                group["lr"] = lr_at(step, peak, config.warmup_steps, config.steps)
            loss = F.cross_entropy(model(tokens, lengths).float(), labels)
            if not math.isfinite(loss.item()):
                raise LmscaleError(f"step {step}: the loss is {loss.item()}; lower the lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(backbone + list(head), 1.0)
            optimizer.step()
            step += 1
            if step % config.eval_every == 0 or step == config.steps:
                scored = metrics(predict(model, val, config.batch_size, pad_id), val.labels)
                log(
                    f"step {step}/{config.steps}: loss {loss.item():.4f}, val accuracy "
                    f"{scored.accuracy:.3f}, macro-F1 {scored.macro_f1:.3f}"
                )
                if scored.accuracy > best[0]:
                    trainable = [p for p in model.parameters() if p.requires_grad]
                    best = (scored.accuracy, [p.detach().clone() for p in trainable])
            if step == config.steps:
                break
    with torch.no_grad():
        trainable = [p for p in model.parameters() if p.requires_grad]
        for param, saved in zip(trainable, best[1], strict=True):
            param.copy_(saved)
    model.eval()
    return metrics(predict(model, val, config.batch_size, pad_id), val.labels)


@torch.no_grad()
def pooled_features(
    model: SequenceClassifier, data: Encoded, batch_size: int, pad_id: int
) -> Tensor:
    """(N, dim) float32 pooled hidden states of every passage, the backbone in eval mode."""
    model.eval()
    rows = [model.pooled(t, n).float() for t, n, _ in batches(data, batch_size, pad_id)]
    return torch.cat(rows)


def _train_head(
    model: SequenceClassifier, train: Encoded, val: Encoded, config: ClassifyConfig, pad_id: int,
    log: Log,
) -> Metrics:  # fmt: skip
    """A linear probe: features once, then full-batch AdamW on the head alone."""
    model.backbone.requires_grad_(False)
    log(f"computing features of {len(train.ids) + len(val.ids)} passages (frozen backbone)")
    features = pooled_features(model, train, config.batch_size, pad_id)
    val_features = pooled_features(model, val, config.batch_size, pad_id)
    # NOTE: standardising the features makes one learning rate fit every backbone.
    mean, std = features.mean(0), features.std(0).clamp(min=1e-6)
    x, x_val = (features - mean) / std, (val_features - mean) / std
    y = torch.tensor(train.labels)
    probe = nn.Linear(x.shape[1], model.head.out_features)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=config.head_lr, weight_decay=1e-2)
    best = (-1.0, None)
    for epoch in range(1, config.head_epochs + 1):
        loss = F.cross_entropy(probe(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            accuracy = (probe(x_val).argmax(-1) == torch.tensor(val.labels)).float().mean().item()
        if accuracy > best[0]:
            best = (accuracy, {k: v.clone() for k, v in probe.state_dict().items()})
        if epoch % max(1, config.head_epochs // 5) == 0:
            log(
                f"epoch {epoch}/{config.head_epochs}: loss {loss.item():.4f}, val acc {accuracy:.3f}"
            )
    probe.load_state_dict(best[1])
    with torch.no_grad():  # fold the standardisation into the head: head(h) = probe((h - m) / s)
        weight = probe.weight / std
        model.head.weight.copy_(weight.to(model.head.weight.dtype))
        model.head.bias.copy_((probe.bias - weight @ mean).to(model.head.bias.dtype))
        # NOTE: the folded head on the cached features is what `predict` computes, without a
        # second pass of the frozen backbone over the validation set.
        logits = model.head(val_features.to(model.head.weight.dtype))
    return metrics(logits.argmax(-1).tolist(), val.labels)
