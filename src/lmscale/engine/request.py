"""What the serving engine takes in and gives back: requests, their parameters, their outputs.

A `Request` is plain state that the scheduler and the engine move along; `RequestOutput` is one
step's news about one request (a delta), what a streaming client shows next.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass, field

import torch

from lmscale.engine.sampling import SamplingParams
from lmscale.errors import LmscaleError

MAX_LOGPROBS = 20
"""The most alternatives a request may ask for per step (OpenAI's `top_logprobs` limit)."""


class QueueFullError(RuntimeError):
    """The engine's waiting queue is full: try again later (a server answers 429)."""


class EngineDeadError(RuntimeError):
    """The engine's step loop stopped on an error; no request can complete."""


class EngineUnavailableError(RuntimeError):
    """The engine holding a request went away (a replica died or is stopping); sent again, the
    request can be served by another (a server answers 503 with Retry-After)."""


@dataclass
class RequestParams(SamplingParams):
    """`SamplingParams` plus what a served request may set.

    `max_new_tokens` is OpenAI's `max_tokens`; `stop` holds its stop strings.
    """

    stop_token_ids: list[int] | None = None
    """Token ids that end generation, besides the tokenizer's end ids (none of them is output)."""
    ignore_eos: bool = False
    """Do not stop at the tokenizer's end ids (only at `stop_token_ids`, stop strings, length)."""
    logprobs: int | None = None
    """None: no log-probabilities; N >= 0: the chosen token's and the N most likely ones'."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_new_tokens < 1:
            raise LmscaleError(f"max_tokens must be at least 1, got {self.max_new_tokens}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise LmscaleError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")

    @classmethod
    def of(cls, params: SamplingParams) -> RequestParams:
        """These parameters as `RequestParams` (unchanged if they already are)."""
        if isinstance(params, RequestParams):
            return params
        return cls(**{name: getattr(params, name) for name in SamplingParams.__dataclass_fields__})


@dataclass
class GenerationRequest:
    """A prompt to complete, as token ids (render chat templates and encode before submitting)."""

    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=RequestParams)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass
class TokenLogprob:
    """Log-probabilities at one generated position (log_softmax of the raw logits, fp32)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]
    """The most likely (token id, logprob) pairs, best first; as many as the request asked for."""


@dataclass
class RequestOutput:
    """One step's news about one request: what was generated since the last output.

    Concatenating `text` over a request's outputs gives its completion; the same for
    `token_ids` and `logprobs`. Text may lag the ids: a partial UTF-8 character or a possible
    start of a stop string is held back until resolved.
    """

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None
    finished: bool
    finish_reason: str | None
    """"stop" (a stop token or string), "length" (max_tokens), "abort"; None until finished."""
    prompt_tokens: int
    completion_tokens: int
    """Tokens generated so far, a final stop token included (OpenAI's usage counts it)."""


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """A request's state inside the engine.

    `num_computed` of its tokens (prompt, then output) have keys and values in its `blocks`; the
    scheduler gives it `len(all_ids) - num_computed` more to compute (1 once it is decoding).
    `block_keys[i]` is the prefix-cache key of `blocks[i]`, for its leading full blocks that were
    found in or offered to the prefix cache (see `prefix_cache.py`).
    """

    request_id: str
    prompt_ids: list[int]
    params: RequestParams
    stop_ids: frozenset[int]
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    blocks: list[int] = field(default_factory=list)
    block_keys: list[bytes] = field(default_factory=list)
    status: Status = Status.WAITING
    generator: torch.Generator | None = None

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)
