"""The ranks of a distributed `l0sparse train`: what the training loop asks of torch.distributed."""

from __future__ import annotations

import gc
import os

import torch

__all__ = ["RankGroup"]


class RankGroup:
    """This process's rank among those ``torchrun`` started (a gloo process group), or a single process: rank 0 of 1.

    Named apart from ``torch.distributed.ProcessGroup``, which it wraps rather than extends.

    Entered once per run: it initialises the group from torchrun's environment
    (RANK, WORLD_SIZE, MASTER_ADDR, ...) unless the caller already did, and
    tears down only what it started.
    """

    def __init__(self) -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank, self._started = 0, False

    def __enter__(self) -> RankGroup:
        if self.world_size > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("gloo")
                self._started = True
            self.rank = dist.get_rank()
        return self

    def __exit__(self, *exc) -> bool:
        if self._started:
            import torch.distributed as dist

            # DDP's reducer sits in reference cycles and holds gloo work objects: free it while the
            # interpreter is alive, or its destruction at exit can abort the process (SIGABRT)
            gc.collect()
            if exc[0] is None:
                dist.barrier()  # every rank done before gloo tears down
            dist.destroy_process_group()
        return False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (float64, so counts stay exact)."""
        if self.world_size == 1:
            return values
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def gather(self, value) -> list:
        """Every rank's ``value`` (a picklable object), in rank order, on every rank."""
        if self.world_size == 1:
            return [value]
        import torch.distributed as dist

        values = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values
