"""Distillation and pruning recovery: runs of the one training loop, with a teacher or a start.

`distill` trains a student config against a frozen teacher (the loss is in
`lmscale.train.distill_loss`) and, with `baseline=True`, the same config for the same steps
without it (same seed, same data order), so the teacher's effect is measured, not assumed:

    OUT/            the distilled student's run (config.toml, metrics, checkpoints/)
    OUT/baseline/   the same student trained without the teacher
    OUT/data/       the data, tokenized with the teacher's tokenizer (when it had to be)

`recover` fine-tunes a pruned model folder for a few steps (`train.init_from`), keeping the
zeros of magnitude or 2:4 pruning (`train.freeze_zeros`), optionally distilled from the model
it was pruned from.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from lmscale.checkpoint import load_pretrained
from lmscale.data import Manifest, TokenDataset, prepare
from lmscale.data.manifest import MANIFEST_FILE
from lmscale.errors import LmscaleError
from lmscale.tokenizer import Tokenizer
from lmscale.train import EvalResult, TrainSummary, evaluate, load_run_config, train
from lmscale.train.config import RunConfig


def training_data(source: str | Path, tokenizer: Tokenizer, out: Path) -> Path:
    """A prepared data folder tokenized with `tokenizer`.

    Args:
        source: a prepared folder, or a corpus ("shakespeare", a text file, folder, .jsonl).
        tokenizer: the tokenizer the data must use (the teacher's, the pruned model's).
        out: where to prepare it when `source` is not already such a folder.

    Returns:
        `source` if it is a folder prepared with `tokenizer`, else `out`, freshly prepared from
        the corpus (a prepared folder of another tokenizer is re-tokenized from its corpus).
    """
    path = Path(source)
    corpus = str(source)
    if (path / MANIFEST_FILE).is_file():
        saved = json.loads((path / Manifest.load(path, verify=False).tokenizer).read_text())
        if saved == json.loads(tokenizer.to_json()):
            return path
        corpus = Manifest.load(path, verify=False).corpus
        print(
            f"{path} was tokenized with another tokenizer: preparing its corpus '{corpus}' with "
            f"the model's into {out}",
            file=sys.stderr,
        )
    prepare(corpus, out, tokenizer=tokenizer)
    return out


@dataclass
class DistillResult:
    """The distilled student, its baseline and the teacher, scored on the same validation text."""

    student: TrainSummary
    teacher: EvalResult
    baseline: TrainSummary | None = None

    def as_dict(self) -> dict:
        out = {"student": self.student.as_dict(), "teacher": self.teacher.as_dict()}
        return out | {"baseline": self.baseline.as_dict() if self.baseline else None}


def distill(
    teacher: str, student_config: str | Path, data: str | Path, out: str | Path,
    overrides: list[str] = (), baseline: bool = False, progress: bool = True,
) -> DistillResult:  # fmt: skip
    """Train `student_config` from `teacher` into `out` (and, if `baseline`, without it).

    Args:
        teacher: a bundled name, .gguf, HF folder or run dir.
        student_config: a TOML run config (its `[distill]` table sets temperature and alpha).
        data: a prepared folder or a corpus; prepared with the teacher's tokenizer if needed.
        out: the student's run directory.
        overrides: `--section.field VALUE` overrides for the student (and the baseline).
        baseline: also train the student without the teacher into `out/baseline`.
        progress: show progress bars.

    Returns:
        Both runs' summaries (validation loss, perplexity) and the teacher's on the same text.
    """
    out = Path(out)
    teacher_model, tokenizer = load_pretrained(teacher)
    data_dir = training_data(data, tokenizer, out / "data")
    args = [*overrides, "--data.path", str(data_dir)]
    config = load_run_config(student_config, [*args, "--distill.teacher", teacher])
    teacher_eval = _score(teacher_model, data_dir, config)
    del teacher_model  # the loop loads its own, on the run's device
    student = train(config, out, progress=progress)
    if not baseline:
        return DistillResult(student, teacher_eval)
    plain = load_run_config(student_config, [*args, "--distill.teacher", "none"])
    return DistillResult(student, teacher_eval, train(plain, out / "baseline", progress=progress))


def _score(model, data_dir: Path, config: RunConfig) -> EvalResult:
    """`model` on the validation split, in the windows the training loop evaluates."""
    val = TokenDataset(data_dir, "val", verify=False)
    if len(val) < 2:
        raise LmscaleError(f"{data_dir} has no validation tokens to score")
    context = min(config.train.context or config.model.max_seq_len, model.config.max_seq_len)
    return evaluate(model, val.tokens, context, config.train.batch_size, None,
                    config.train.eval_max_tokens)  # fmt: skip


@dataclass
class RecoverResult:
    """A pruned model before and after its recovery fine-tune, on the same validation text."""

    before: EvalResult
    after: TrainSummary

    def as_dict(self) -> dict:
        after = self.after.as_dict()
        return {"before_val_ppl": self.before.perplexity, "after_val_ppl": after.get("val_ppl"),
                "before_val_loss": self.before.loss, "run": after}  # fmt: skip


def recover(
    pruned: str | Path, out: str | Path, data: str | Path = "shakespeare", steps: int = 100,
    lr: float = 1e-4, teacher: str | None = None, keep_zeros: bool = False,
    overrides: list[str] = (), progress: bool = True,
) -> RecoverResult:  # fmt: skip
    """Fine-tune the pruned model folder `pruned` for `steps` steps into the run directory `out`.

    Args:
        pruned: a model folder (e.g. written by `prune_model`).
        out: the run directory (its data, when prepared, goes to `out/data`).
        data: a prepared folder or a corpus, prepared with the model's tokenizer if needed.
        steps: optimizer steps.
        lr: peak learning rate (cosine schedule, 10% warm-up).
        teacher: distill from this model (the unpruned one) instead of plain training.
        keep_zeros: keep the zero weights at zero (magnitude and 2:4 pruning).
        overrides: further `--section.field VALUE` overrides (batch size, context, ...).
        progress: show a progress bar.

    Returns:
        The validation perplexity before, and the run's summary after.
    """
    if steps < 1:
        raise LmscaleError(f"--recover-steps must be positive, got {steps}")
    model, tokenizer = load_pretrained(pruned, dtype="float32")
    out = Path(out)
    data_dir = training_data(data, tokenizer, out / "data")
    args = [
        "--train.init_from", str(pruned), "--data.path", str(data_dir),
        "--train.max_steps", str(steps), "--train.lr", str(lr),
        "--train.warmup_steps", str(max(1, steps // 10)), "--train.batch_size", "8",
        "--train.context", "256", "--train.eval_interval", str(steps),
        "--train.checkpoint_interval", str(steps), "--train.eval_max_tokens", "32768",
        "--train.keep_checkpoints", "1", "--train.freeze_zeros", str(keep_zeros),
        *(["--distill.teacher", teacher] if teacher else []), *overrides,
    ]  # fmt: skip
    config = load_run_config(None, args)
    config.model = model.config  # only for the context cap in `_score`; the loop sets it too
    before = _score(model, data_dir, config)
    del model
    return RecoverResult(before, train(config, out, progress=progress))
