"""Multi-process training on torch.distributed, as launched by ``torchrun`` (DDP; gloo on CPU, NCCL on CUDA).

``torchrun --nproc_per_node=N cli.py train ...`` sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; every process
then trains the same model on its share of each global batch (see :class:`train.sequence.NextItemLoss`), and
process 0 alone writes the run directory.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

from errors import DeviceError

logger = logging.getLogger(__name__)


def launched_by_torchrun() -> bool:
    """True when this process is one of several started by ``torchrun``."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device: torch.device) -> tuple[torch.device, int, int]:
    """Join the process group (once) and return ``(device, rank, world_size)``; ``(device, 0, 1)`` alone.

    On CUDA each process takes GPU ``LOCAL_RANK``; a CUDA device with fewer GPUs than processes is an error.
    """
    if not launched_by_torchrun():
        return device, 0, 1
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise DeviceError(f"process {rank} needs GPU {local}, but only {torch.cuda.device_count()} exist")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    logger.info("process %d of %d on %s", rank, world, device)
    return device, rank, world
