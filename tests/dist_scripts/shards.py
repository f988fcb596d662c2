"""Under torchrun: what Batches delivers on this rank, as image fingerprints, written to
OUT/rank<R>.npz: the training images of epochs 0 and 1 (no augmentation) and the test images."""
import hashlib
import sys

import numpy as np
import torch

from fastres.data import Batches
from fastres.distributed import Dist


def fingerprints(b, batches):
    """Each normalized image back to its uint8 pixels, hashed (an image's identity)."""
    out = []
    for x, _ in batches:
        x = x.float() * b.std[:, None, None] + b.mean[:, None, None]
        px = (x * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
        out += [int.from_bytes(hashlib.sha1(img.tobytes()).digest()[:8], "little", signed=True) for img in px]
    return np.array(out, dtype=np.int64)


data, out, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
d = Dist.from_env("cpu")
b = Batches(data, batch // d.world, 100, torch.device("cpu"), seed=5, num_workers=1, distributed=True,
            rank=d.rank, world=d.world, augment=False)
np.savez(f"{out}/rank{d.rank}.npz", epoch0=fingerprints(b, b.train_epoch(0)), epoch1=fingerprints(b, b.train_epoch(1)),
         test=fingerprints(b, b.test()))
d.close()
