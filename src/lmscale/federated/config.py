"""One federated run's settings: the model, the clients, the rounds, the privacy."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from lmscale.errors import LmscaleError
from lmscale.federated.local import LocalConfig
from lmscale.federated.partition import SHAKESPEARE_GENRES
from lmscale.finetune.lora import LoRAConfig

STRATEGIES = ("fedavg", "fedprox")
ADAPTERS = ("lora", "full")


@dataclass
class FederateConfig:
    """What `lmscale federate` runs (see `lmscale.federated`)."""

    model: str = "smollm2-135m-instruct"
    """The starting model: a bundled name, .gguf, Hugging Face folder or native folder."""
    data: str = SHAKESPEARE_GENRES
    """`shakespeare-genres` or a folder with one entry per client (see `partition`)."""
    clients: int = 6
    rounds: int = 10
    fraction: float = 1.0
    """The fraction of clients asked to train each round."""
    strategy: str = "fedavg"
    mu: float = 0.01
    """FedProx's proximal weight (fedprox only)."""
    adapter: str = "lora"
    """lora: clients train and send LoRA adapters; full: every weight."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    local: LocalConfig = field(default_factory=LocalConfig)
    dp_clip: float | None = None
    """Client-level DP: the L2 bound on each client's update."""
    dp_noise: float | None = None
    """Client-level DP: the noise multiplier z (std z * clip / clients per round)."""
    dp_epsilon: float | None = None
    """Client-level DP: the epsilon to reach after `rounds` (sets dp_noise)."""
    dp_delta: float | None = None
    """delta of the stated guarantee (default: below 1 / the number of protected units)."""
    dp_sgd: bool = False
    """Sample-level DP-SGD inside each client (Opacus) with --dp-noise / --dp-clip."""
    seed: int = 0
    threads: int = 1
    """torch threads (and Ray CPUs) per simulated client."""

    def __post_init__(self) -> None:
        for name in ("clients", "rounds", "threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise LmscaleError(f"--{name} must be a positive integer, got {value}")
        if self.strategy not in STRATEGIES:
            raise LmscaleError(f"--strategy must be fedavg or fedprox, got {self.strategy!r}")
        if self.adapter not in ADAPTERS:
            raise LmscaleError(f"--adapter must be lora or full, got {self.adapter!r}")
        if not 0 < self.fraction <= 1:
            raise LmscaleError(f"--fraction must be in (0, 1], got {self.fraction}")
        if self.mu < 0:
            raise LmscaleError(f"--mu must be non-negative, got {self.mu}")
        if self.dp_epsilon is not None and self.dp_noise is not None:
            raise LmscaleError("give --dp-noise or --dp-epsilon, not both")
        if self.dp_sgd:
            if self.dp_epsilon is not None:
                raise LmscaleError("--dp-sgd takes --dp-noise (and --dp-clip), not --dp-epsilon")
            if self.dp_noise is None:
                raise LmscaleError("--dp-sgd needs --dp-noise")
        elif self.dp_clip is not None or self.dp_noise is not None or self.dp_epsilon is not None:
            if self.dp_clip is None:
                raise LmscaleError("client-level DP needs --dp-clip (the bound on an update)")
            if self.dp_noise is None and self.dp_epsilon is None:
                raise LmscaleError("client-level DP needs --dp-noise or --dp-epsilon")
        for name in ("dp_clip", "dp_noise", "dp_epsilon"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                flag = "--" + name.replace("_", "-")
                raise LmscaleError(f"{flag} must be positive, got {value}")
        if self.dp_delta is not None and not 0 < self.dp_delta < 1:
            raise LmscaleError(f"--dp-delta must be in (0, 1), got {self.dp_delta}")
        if self.dp_sgd:  # the clients' own steps are DP-SGD
            self.local.dp_noise = self.dp_noise
            self.local.dp_clip = self.dp_clip or 1.0

    @property
    def client_level_dp(self) -> bool:
        return not self.dp_sgd and self.dp_clip is not None

    @property
    def clients_per_round(self) -> int:
        return max(1, round(self.clients * self.fraction))

    @property
    def local_mu(self) -> float:
        return self.mu if self.strategy == "fedprox" else 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> FederateConfig:
        raw = json.loads(text)
        raw["lora"] = LoRAConfig(**raw["lora"])
        raw["local"] = LocalConfig(**raw["local"])
        return cls(**raw)
