"""Run by ``torchrun`` from test_distributed.py: one DDP step on a share of a fixed global batch.

Each process writes its loss share and the synchronised gradients to ``<out>/rank<r>.pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[2])]  # helpers, repo

from ddp_common import one_step  # noqa: E402

if __name__ == "__main__":
    catalog, out, loss = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    import torch.distributed as dist

    from train.distributed import init_distributed

    init_distributed(torch.device("cpu"))
    value, grads = one_step(catalog, loss)
    torch.save({"loss": value, "grads": grads}, out / f"rank{dist.get_rank()}.pt")
    dist.destroy_process_group()
