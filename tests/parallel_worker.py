"""One rank of the 2-process DataParallelSVI check (run by tests/test_parallel.py).

Environment: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (as torchrun sets them).
Arguments: output file, number of steps.
"""

import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pyro  # noqa: E402
import torch  # noqa: E402

from pyro_latdiff.parallel import DataParallelSVI, destroy_process_group, init_process_group  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from parallel_problem import make_problem, shard_fn  # noqa: E402


def main(path: str, num_steps: int) -> None:
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    rank, world = init_process_group("gloo")
    pyro.clear_param_store()
    problem, y, guide, optim = make_problem()
    svi = DataParallelSVI(problem.model, guide, optim, shard_fn=shard_fn, seed=3)
    losses = [svi.step(y) for _ in range(num_steps)]
    if rank == 0:
        torch.save({"params": svi.parameters(), "losses": losses}, path)
    destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
