"""The process group of the two-rank tests that ``torch.multiprocessing.spawn`` starts (gloo, CPU)."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch.distributed as dist


@contextlib.contextmanager
def gloo_group(rank: int, world: int, init_file: str, **options: Any) -> Iterator[None]:
    """A gloo group for the block; on success every rank waits for the others before the group is
    torn down (a rank that destroys it while another still talks aborts that one's pair thread).
    ``options``: more ``init_process_group`` keywords (``timeout=``)."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, **options)
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()
