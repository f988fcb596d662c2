"""Under torchrun: write this rank's training sample indices for epochs 0 and 1 to OUT/rank<R>.npy."""
import sys

import numpy as np
import torch

from fastres.data import Batches
from fastres.distributed import Dist

data, out, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
d = Dist.from_env("cpu")
b = Batches(data, batch // d.world, 100, torch.device("cpu"), seed=5, num_workers=1, distributed=True,
            rank=d.rank, world=d.world)
order = [b.train_loader.traversal_order.sample_order(e)[: len(b) * (batch // d.world)] for e in (0, 1)]
np.save(f"{out}/rank{d.rank}.npy", np.stack(order))
d.close()
