"""A federated run's folder: the rounds log, the plot, the global model.

OUT/
    config.json       the run's FederateConfig
    rounds.jsonl      one line per round (0 is the starting model): per client its training
                      loss, held-out loss and perplexity, examples (and epsilon under DP-SGD);
                      the global held-out loss and perplexity; replies failed; payload bytes
                      sent and received; seconds; epsilon and delta of the guarantee
    perplexity.png    held-out perplexity by round, each client and the global set, with the
                      starting model's global perplexity as the baseline
    adapter/          the global LoRA adapter (`--adapter OUT/adapter` on generate, chat...)
    model/            or, with --adapter full, the global model (`--model OUT/model`)
"""

from __future__ import annotations

import json
from pathlib import Path

from lmscale.checkpoint import save_model_dir
from lmscale.config import to_dict
from lmscale.errors import LmscaleError
from lmscale.federated.config import FederateConfig
from lmscale.finetune.adapter import adapter_record, write_adapter
from lmscale.finetune.lora import adapter_state_dict
from lmscale.model import Transformer
from lmscale.tokenizer import Tokenizer

ROUNDS = "rounds.jsonl"
PLOT = "perplexity.png"


def prepare_out(out: Path, config: FederateConfig) -> None:
    """Create `out` for a new run; a folder that already holds one is refused."""
    if (out / ROUNDS).exists():
        raise LmscaleError(f"{out} already holds a federated run: choose a new --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(config.to_json() + "\n")


def append_round(out: Path, line: dict) -> None:
    with (out / ROUNDS).open("a") as f:
        f.write(json.dumps(line) + "\n")


def read_rounds(out: str | Path) -> list[dict]:
    path = Path(out) / ROUNDS
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def save_global(
    out: Path, model: Transformer, tokenizer: Tokenizer, config: FederateConfig
) -> Path:
    """The global model as every verb loads it: an adapter folder, or a native model folder."""
    if config.adapter == "lora":
        record = adapter_record(model, config.lora, extra={
            "base_model": config.model, "federated": json.loads(config.to_json()),
        })  # fmt: skip
        return write_adapter(out / "adapter", adapter_state_dict(model), record)
    settings = {"model": to_dict(model.config), "tokenizer": tokenizer.settings}
    return save_model_dir(out / "model", model.state_dict(), settings, tokenizer.to_json())


def plot_rounds(out: Path) -> Path:
    """perplexity.png from rounds.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = read_rounds(out)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = sorted({n for r in rounds for n in r["clients"]})
    for name in names:
        points = [(r["round"], r["clients"][name]["heldout_perplexity"]) for r in rounds
                  if "heldout_perplexity" in r["clients"].get(name, {})]  # fmt: skip
        if points:
            ax.plot(*zip(*points, strict=True), marker=".", linewidth=1, alpha=0.7, label=name)
    glob = [(r["round"], r["global"]["perplexity"]) for r in rounds if "global" in r]
    if glob:
        ax.plot(
            *zip(*glob, strict=True),
            color="black",
            linewidth=2.5,
            marker="o",
            label="global held-out",
        )
        ax.axhline(glob[0][1], color="grey", linestyle="--", label="starting model (global)")
    ax.set_xlabel("round")
    ax.set_ylabel("held-out perplexity")
    ax.set_title("Federated training: held-out perplexity by round")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / PLOT, dpi=120)
    plt.close(fig)
    return out / PLOT
