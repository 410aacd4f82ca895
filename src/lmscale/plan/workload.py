"""What is being trained: the model, the batch, the tokens, and the precision recipe."""

from __future__ import annotations

from dataclasses import dataclass

from lmscale.errors import LmscaleError
from lmscale.model.config import ModelConfig


@dataclass(frozen=True)
class Precision:
    """Bytes per parameter and per activation element of one mixed-precision recipe."""

    name: str
    param_bytes: int
    grad_bytes: int
    adamw_bytes: int
    """Optimizer state per parameter with AdamW (fp32 master copy included where there is one)."""
    sgd_bytes: int
    """Optimizer state per parameter with SGD and momentum."""
    residual_bytes: int
    """The residual stream and the norms' inputs."""
    activation_bytes: int
    """Inputs of matrix products and what attention and the MLP keep."""
    autocast: bool
    """Autocast casts a matrix product's input per call: q, k and v each keep their own copy."""
    fused_norms: bool
    """Norm kernels that keep only their input (Megatron-LM, Transformer Engine); PyTorch's
    composite F.rms_norm also keeps the normalised tensor."""
    math: str
    """The dtype the matrix products run in: picks the device's peak FLOP/s."""
    description: str


PRECISIONS = {p.name: p for p in (
    Precision("mixed", 2, 2, 12, 8, 2, 2, False, True, "bf16",
              "16-bit weights, gradients and activations, fp32 master weights and moments "
              "(the ZeRO / Megatron-LM / DeepSpeed recipe)"),
    Precision("amp", 4, 4, 8, 4, 4, 2, True, False, "bf16",
              "fp32 weights, gradients and moments, torch.autocast to bf16 (lmscale, "
              "Hugging Face Trainer; FSDP2 with a bf16 MixedPrecisionPolicy)"),
    Precision("fp32", 4, 4, 8, 4, 4, 4, False, False, "fp32", "everything in fp32"),
    Precision("bf16", 2, 2, 4, 2, 2, 2, False, False, "bf16",
              "everything in bf16, optimizer states included"),
)}  # fmt: skip
OPTIMIZERS = ("adamw", "sgd")
ATTENTION = ("flash", "eager")
"""flash: a fused kernel that keeps no score matrix (FlashAttention, SDPA); eager: scores kept."""
CHINCHILLA_TOKENS_PER_PARAM = 20
"""Compute-optimal tokens per parameter (Hoffmann et al. 2022, Approach 1)."""


@dataclass(frozen=True)
class Workload:
    """A training job, independent of how it is spread over devices."""

    model: ModelConfig
    seq_len: int
    global_batch_tokens: float
    """Tokens per optimizer step, over all devices."""
    tokens: float | None = None
    """Tokens to train on; None means the compute-optimal 20 per parameter."""
    precision: str = "mixed"
    optimizer: str = "adamw"
    attention: str = "flash"
    fused_loss: bool = False
    """The output projection and cross-entropy run in chunks (lmscale's single-process path):
    no full logits are kept."""

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise LmscaleError(
                f"--precision must be one of {', '.join(PRECISIONS)}, got '{self.precision}'"
            )
        if self.optimizer not in OPTIMIZERS:
            raise LmscaleError(f"--optimizer must be adamw or sgd, got '{self.optimizer}'")
        if self.attention not in ATTENTION:
            raise LmscaleError(f"--attention must be flash or eager, got '{self.attention}'")
        if self.seq_len < 1:
            raise LmscaleError(f"--seq must be positive, got {self.seq_len}")
        if self.model.family == "gpt2" and self.seq_len > self.model.max_seq_len:
            raise LmscaleError(
                f"--seq {self.seq_len} is longer than the {self.model.max_seq_len} learned "
                "positions of this GPT-2-style model: use a shorter --seq"
            )
        if self.global_batch_tokens < self.seq_len:
            raise LmscaleError(
                f"--global-batch-tokens {self.global_batch_tokens:.0f} is less than one sequence "
                f"of --seq {self.seq_len} tokens"
            )

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step."""
        return max(1, round(self.global_batch_tokens / self.seq_len))

    @property
    def train_tokens(self) -> float:
        return self.tokens or CHINCHILLA_TOKENS_PER_PARAM * self.model.num_params()

    @property
    def recipe(self) -> Precision:
        return PRECISIONS[self.precision]

    @property
    def optimizer_bytes(self) -> int:
        recipe = self.recipe
        return recipe.adamw_bytes if self.optimizer == "adamw" else recipe.sgd_bytes
