"""Training memory of one device: parameters, gradients, optimizer states, activations and
temporary buffers, each on its own line.

Model states follow ZeRO (Rajbhandari et al. 2019): with mixed-precision AdamW, 2 + 2 + 12 bytes
per parameter, the optimizer's 12 sharded from ZeRO-1, gradients from ZeRO-2, parameters from
ZeRO-3. Activations are counted tensor by tensor, as Korthikanti et al. 2022 ("Reducing
Activation Recomputation in Large Transformer Models", section 4) count them: for their GPT
setting (16-bit, eager attention, dropout) the items below add up to their
s*b*h*(34 + 5*a*s/h) bytes per layer, and their tensor-parallel split (10 of the 34 replicated
without sequence parallel). The same items also cover grouped-query attention, SwiGLU, fused
attention kernels, no dropout, and autocast (fp32 residual stream, one 16-bit copy of the input
per projection).

Pipeline stages keep activations as their schedule says (`plan.pipeline`): GPipe every
micro-batch of the step, 1F1B `pp` of them on the first stage, interleaved 1F1B
pp (1 + (pp - 1)/(pp v)) there; the last stage keeps the loss's tensors of one micro-batch
(of every micro-batch under GPipe).

The peak: with one micro-batch per step, gradients appear while the backward frees activations,
so the peak is the larger of the two sides; with gradient accumulation (or a pipeline) the
gradients stay from one micro-batch to the next and add to the activations.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmscale.model.config import ModelConfig
from lmscale.plan.flops import layer_matmul_params
from lmscale.plan.pipeline import in_flight_micro_batches
from lmscale.plan.strategy import Strategy
from lmscale.plan.workload import Workload

BUCKET_ELEMENTS = 40_000_000
"""ZeRO-1/2 gradient and parameter communication buckets (Megatron-LM's distributed-optimizer
bucket size)."""

DDP_BUCKETS = "DDP gradient buckets (a flat copy of the gradients)"
GATHERED = "gathered parameters (this + next layer)"
RECOMPUTED = "one block recomputed in the backward"
BACKWARD_WORKING_SET = "a block's backward: gradients of its widest tensors"


@dataclass
class MemoryBreakdown:
    """Bytes one device holds at the peak of a training step."""

    parameters: float
    gradients: float
    optimizer: float
    activations: float
    buffers: dict[str, float] = field(default_factory=dict)
    """Temporary and communication buffers, by name."""
    peak: float = 0.0
    """What the device holds at the peak of a step (see the module docstring)."""
    stage: str = "every device"
    """Which pipeline stage this is (the first holds the most activations, the last the logits)."""
    activation_items: dict[str, float] = field(default_factory=dict)
    """Bytes per token of each tensor one block keeps for the backward (before any split)."""

    @property
    def model_states(self) -> float:
        return self.parameters + self.gradients + self.optimizer

    @property
    def buffer_total(self) -> float:
        return sum(self.buffers.values())

    def largest_parts(self, n: int = 2) -> list[tuple[str, float]]:
        parts = {"parameters": self.parameters, "gradients": self.gradients,
                 "optimizer states": self.optimizer, "activations": self.activations,
                 "buffers": self.buffer_total}  # fmt: skip
        return sorted(parts.items(), key=lambda kv: -kv[1])[:n]


@dataclass(frozen=True)
class _Item:
    name: str
    bytes_per_token: float
    split: bool
    """Sharded by tensor parallel even without sequence parallel."""


def block_activation_items(workload: Workload) -> list[_Item]:
    """What one block keeps for its backward, in bytes per token, before any parallel split."""
    m, r = workload.model, workload.recipe
    d, dq, dkv, f, heads = m.dim, m.q_dim, m.n_kv_heads * m.head_dim, m.hidden_dim, m.n_heads
    res, act, s = r.residual_bytes, r.activation_bytes, workload.seq_len
    dropout = m.dropout > 0
    gated = m.family != "gpt2"
    attn_copies = 3 if r.autocast else 1
    mlp_copies = 2 if r.autocast and gated else 1
    norm = d * res * (2 if gated and not r.fused_norms else 1)  # RMSNorm: input + normalised
    items = [
        _Item("attention norm", norm, False),
        _Item("q/k/v projection input", attn_copies * d * act, False),
        _Item("queries, keys, values", (dq + 2 * dkv) * act, True),
    ]
    if workload.attention == "eager":
        items.append(_Item("attention scores (softmax)", heads * s * act, True))
        if dropout:
            items.append(_Item("attention dropout mask + output", heads * s * (1 + act), True))
        items.append(_Item("output projection input", dq * act, True))
    else:  # a fused kernel keeps its output (the output projection's input) and fp32 statistics
        items.append(_Item("attention output + softmax statistics", dq * act + heads * 4, True))
    items.append(_Item("MLP norm", norm, False))
    items.append(_Item("MLP input", mlp_copies * d * act, False))
    mlp_tensors = 4 if gated else 2  # SwiGLU: gate, silu(gate), up, product; GELU: in, out
    items.append(_Item("MLP activations", mlp_tensors * f * act, True))
    if dropout:
        items.append(_Item("residual dropout masks", 2 * d, False))
    return items


def _score_items() -> tuple[str, ...]:
    return ("attention scores (softmax)", "attention dropout mask + output")


def training_memory(workload: Workload, strategy: Strategy) -> MemoryBreakdown:
    """Peak memory of the busiest device: the first or the last pipeline stage, whichever is more."""
    stages = [_stage_memory(workload, strategy, first=True, last=strategy.pp == 1)]
    if strategy.pp > 1:
        stages.append(_stage_memory(workload, strategy, first=False, last=True))
    return max(stages, key=lambda b: b.peak)


def _stage_memory(workload: Workload, s: Strategy, first: bool, last: bool) -> MemoryBreakdown:
    model, recipe = workload.model, workload.recipe
    layers = model.n_layers // s.pp
    params = stage_parameters(model, s, first, last)
    grads_shard = s.dp if s.zero >= 2 else 1
    parameters = params * recipe.param_bytes / (s.dp if s.zero == 3 else 1)
    gradients = params * recipe.grad_bytes / grads_shard
    optimizer = params * workload.optimizer_bytes / (s.dp if s.zero >= 1 else 1)

    items = block_activation_items(workload)
    tokens = s.micro_batch * workload.seq_len
    per_layer_full = tokens * sum(_split(i, s) for i in items)
    kept = block_activations(workload, s)
    in_flight = _in_flight(workload, s, first)
    activations = kept * layers * in_flight
    if last:
        held = s.micro_batches(workload) if s.pp_schedule == "gpipe" and s.pp > 1 else 1
        activations += held * tokens * _head_activation_bytes(workload, s)

    buffers = _buffers(workload, s, params, layers, per_layer_full, tokens, last)
    breakdown = MemoryBreakdown(
        parameters, gradients, optimizer, activations, buffers,
        stage=_stage_name(s, first, last),
        activation_items={i.name: i.bytes_per_token for i in items},
    )  # fmt: skip
    breakdown.peak = _peak(breakdown, s, workload, layers, kept * in_flight)
    return breakdown


def _in_flight(workload: Workload, s: Strategy, first: bool) -> float:
    """Micro-batches whose activations the stage keeps at its peak (1 without a pipeline)."""
    if s.pp == 1:
        return 1.0
    rank = 0 if first else s.pp - 1
    micro = s.micro_batches(workload)
    return in_flight_micro_batches(s.pp, micro, s.pp_schedule, s.virtual_stages, rank)


def block_activations(workload: Workload, s: Strategy) -> float:
    """Bytes one block keeps for its backward, per micro-batch, on one device.

    Korthikanti et al. 2022, Table 2, in their setting (16-bit, eager attention, dropout):
    s*b*h*(34 + 5*a*s/h) with no parallelism; (10 + 24/t + 5*a*s/(h*t)) under tensor parallel;
    divided by t throughout with sequence parallel; the 5*a*s/h term gone with selective
    recomputation; 2*s*b*h (the block's input) with full recomputation.
    """
    items = block_activation_items(workload)
    tokens = s.micro_batch * workload.seq_len
    if s.recompute == "full":
        model = workload.model
        return tokens * model.dim * workload.recipe.residual_bytes / (s.tp if s.sp else 1)
    if s.recompute == "selective":
        items = [i for i in items if i.name not in _score_items()]
    return tokens * sum(_split(i, s) for i in items)


def _split(item: _Item, s: Strategy) -> float:
    return item.bytes_per_token / (s.tp if item.split or s.sp else 1)


def stage_parameters(
    model: ModelConfig, s: Strategy, first: bool = True, last: bool = True
) -> float:
    """Parameters of one device's pipeline stage (tensor-parallel shards), before ZeRO."""
    layers = model.n_layers // s.pp
    last = last or s.pp == 1
    matmul = layer_matmul_params(model)
    per_layer = model.num_params(embeddings=False) - model.dim * (2 if model.bias else 1)
    per_layer /= model.n_layers
    count = layers * ((per_layer - matmul) + matmul / s.tp)
    embedding = model.vocab_size * model.dim / s.tp
    if first:
        count += embedding + (model.max_seq_len * model.dim if model.family == "gpt2" else 0)
    if last:
        count += model.dim * (2 if model.bias else 1)  # final norm
        # A tied output shares the embedding on one device; across stages the last holds a copy.
        if not model.tie_embeddings or not first:
            count += embedding
    return count


def _head_activation_bytes(workload: Workload, s: Strategy) -> float:
    """Per token: the final norm's input, the output projection's input, and what the loss keeps."""
    model, recipe = workload.model, workload.recipe
    norms = 2 if model.family != "gpt2" and not recipe.fused_norms else 1
    norm = model.dim * norms * recipe.residual_bytes / (s.tp if s.sp else 1)
    if workload.fused_loss:  # the chunked loss keeps only d(loss)/d(hidden)
        return norm + model.dim * recipe.activation_bytes
    # The output projection's input, and fp32 log-probabilities (vocabulary-parallel).
    return norm + model.dim * recipe.activation_bytes + 4 * model.vocab_size / s.tp


def _buffers(
    workload: Workload, s: Strategy, params: float, layers: int, layer_activations: float,
    tokens: int, last: bool,
) -> dict[str, float]:  # fmt: skip
    model, recipe = workload.model, workload.recipe
    compute_bytes = 4 if recipe.math == "fp32" else 2
    buffers: dict[str, float] = {}
    if s.zero == 3:
        layer = model.num_params(embeddings=False) / model.n_layers / s.tp
        biggest = max(layer, model.vocab_size * model.dim / s.tp)
        buffers[GATHERED] = 2 * biggest * compute_bytes
        buffers["unsharded gradients of one layer"] = layer * recipe.grad_bytes
    elif recipe.autocast:  # cached by autocast, kept by each product for its backward
        head = model.vocab_size * model.dim / s.tp if last and not workload.fused_loss else 0
        buffers["16-bit weight copies (autocast)"] = 2 * (
            layers * layer_matmul_params(model) / s.tp + head
        )
    if s.dp > 1 and s.zero == 0:
        buffers[DDP_BUCKETS] = params * recipe.grad_bytes
    elif s.dp > 1 and s.zero in (1, 2):
        bucket = min(params, BUCKET_ELEMENTS)
        buffers["gradient and parameter buckets"] = bucket * (recipe.grad_bytes + compute_bytes)
    if last:
        if workload.fused_loss:
            buffers["output-weight gradient of the chunked loss (fp32)"] = (
                4 * model.vocab_size * model.dim
            )
        else:
            buffers["logits (16-bit) and their fp32 gradient"] = (
                tokens * (2 + 4) * model.vocab_size / s.tp
            )
    if s.recompute == "full":
        buffers[RECOMPUTED] = layer_activations
    # While a block runs backward, the gradients of its widest tensors (the MLP's) exist beside
    # the tensors themselves: about two of them at a time.
    buffers[BACKWARD_WORKING_SET] = 2 * tokens * model.hidden_dim * recipe.activation_bytes / s.tp
    return buffers


def _peak(
    b: MemoryBreakdown, s: Strategy, workload: Workload, layers: int, layer_kept: float
) -> float:
    """Model states, persistent buffers, and the larger of the forward and backward sides.

    Forward side (the backward's start): every activation and temporary buffer. Backward side
    (its end): every gradient, the first block's activations, and what the backward itself
    builds (its working set, a recomputed block, gathered ZeRO-3 parameters).
    """
    persistent = b.parameters + b.optimizer + b.buffers.get(DDP_BUCKETS, 0.0)
    transient = b.buffer_total - b.buffers.get(DDP_BUCKETS, 0.0)
    forward_side = b.activations + transient
    if s.micro_batches(workload) > 1 or s.pp > 1:  # gradients stay between micro-batches
        return persistent + b.gradients + forward_side
    rebuilt = sum(b.buffers.get(name, 0.0) for name in (RECOMPUTED, GATHERED, BACKWARD_WORKING_SET))
    backward_side = b.gradients + layer_kept + rebuilt
    return persistent + max(forward_side + b.gradients / max(1, layers), backward_side)


def _stage_name(s: Strategy, first: bool, last: bool) -> str:
    if s.pp == 1:
        return "every device"
    return "first pipeline stage" if first else "last pipeline stage"
