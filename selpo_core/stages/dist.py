"""Several processes (torchrun / accelerate launch): ranks, the process group, barriers, one decision for all.

Under torchrun every rank runs each stage collectively; the main process (rank 0) takes the stage's lock,
decides whether it must run, and publishes it. Without a launcher all of this is a no-op.
"""

from __future__ import annotations

import os
from typing import Any


def rank_and_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return rank_and_world()[0] == 0


def init_distributed() -> None:
    """Stages without accelerate (scoring, generation) need the process group too."""
    import torch
    import torch.distributed as dist

    if dist.is_available() and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def agree(value: Any) -> Any:
    """Rank 0's `value` on every rank (the others' are ignored)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
