"""Launched by tests/test_scale.py under torchrun: 2 CPU processes, gloo backend."""

import gc
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import l0sparse


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the same initial weights everywhere (DDP also broadcasts rank 0's)
    model = l0sparse.L0MLP((12, 8, 3))
    ddp = DistributedDataParallel(model)
    torch.manual_seed(1000 + rank)  # each rank its own data and its own gate noise
    optimizer = torch.optim.Adam(ddp.parameters(), lr=0.05)
    first_sample = None
    for _ in range(20):
        x, y = torch.randn(16, 12), torch.randint(0, 3, (16,))
        if first_sample is None:
            first_sample = model.l0_layers()[0].gate().detach().tolist()
        loss = F.cross_entropy(ddp(x), y) + l0sparse.penalty(model, 1.0, N=1000)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    result = {"rank": rank, "log_alpha": [layer.gate.log_alpha.detach().tolist() for layer in model.l0_layers()],
              "first_sample": first_sample}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
        json.dump(result, handle)
    # release DDP's reducer (it holds gloo work objects) while the interpreter is alive, then tear down
    del ddp, optimizer
    gc.collect()
    dist.barrier()  # both ranks done before gloo tears down its threads
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
