"""Run under torchrun by test_loss_parallel.py: the vocabulary-split loss against the full one.

loss_worker.py OUT_DIR VOCAB   each rank writes rank{r}.json: loss and gradient errors
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from lmscale.train import loss_parallel
from lmscale.train.fused_loss import IGNORE_INDEX
from lmscale.train.loss_parallel import vocab_parallel_cross_entropy


def main(out_dir: str, vocab: int) -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))
    loss_parallel.CHUNK_ELEMENTS = 2**9  # several chunks of rows (64 each), to test the loop
    gen = torch.Generator().manual_seed(0)  # the same full tensors on every rank
    hidden = torch.randn(96, 16, generator=gen)
    weight = torch.randn(vocab, 16, generator=gen)
    targets = torch.randint(0, vocab, (96,), generator=gen)
    targets[::5] = IGNORE_INDEX
    hidden.requires_grad_(True)
    sharded = distribute_tensor(weight, mesh, [Shard(0)], src_data_rank=None).requires_grad_(True)
    loss = vocab_parallel_cross_entropy(hidden, sharded, targets)
    loss.backward()

    full_hidden, full_weight = hidden.detach().requires_grad_(True), weight.requires_grad_(True)
    reference = F.cross_entropy(
        full_hidden @ full_weight.T, targets, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    reference.backward()
    local_rows = sharded.to_local().shape[0]
    shards = torch.chunk(torch.arange(vocab), dist.get_world_size())
    start = int(shards[dist.get_rank()][0])
    report = {
        "loss": loss.item(),
        "reference": reference.item(),
        "hidden_grad_err": (hidden.grad - full_hidden.grad).abs().max().item(),
        "weight_grad_err": (sharded.grad.to_local() - full_weight.grad[start : start + local_rows])
        .abs()
        .max()
        .item(),
        "local_rows": local_rows,
    }
    Path(out_dir, f"rank{dist.get_rank()}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
