"""Training: the loop, optimizers and schedules, precision, evaluation, run directories."""

from lmscale.train.config import DataConfig, RunConfig, TrainConfig, load_run_config
from lmscale.train.evaluate import EvalResult, evaluate, unigram_loss
from lmscale.train.loop import NonFiniteLoss, TrainSummary, resume_config, train

__all__ = [
    "DataConfig", "EvalResult", "NonFiniteLoss", "RunConfig", "TrainConfig", "TrainSummary",
    "evaluate", "load_run_config", "resume_config", "train", "unigram_loss",
]  # fmt: skip
