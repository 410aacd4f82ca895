"""Planning for scale: memory, FLOPs, time, cost and energy of a model on a cluster, before any of
it is spent; and scaling-law fits of loss against size and compute.

Pure Python: nothing here imports torch at module level, so `lmscale plan` answers at once on any
laptop. The scaling study (`lmscale.plan.sweep`) imports the trainer only when it runs.
"""

from lmscale.plan.flops import forward_flops, training_flops, training_flops_per_token
from lmscale.plan.hardware import CATALOG, Accelerator, accelerator
from lmscale.plan.models import model_from_params, named_model
from lmscale.plan.pipeline import (
    SCHEDULES,
    pipeline_bubble_fraction,
    pipeline_message_bytes,
    pipeline_p2p_bytes,
)

__all__ = [
    "CATALOG",
    "SCHEDULES",
    "Accelerator",
    "accelerator",
    "forward_flops",
    "model_from_params",
    "named_model",
    "pipeline_bubble_fraction",
    "pipeline_message_bytes",
    "pipeline_p2p_bytes",
    "training_flops",
    "training_flops_per_token",
]
