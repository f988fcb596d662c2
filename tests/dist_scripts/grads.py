"""Under torchrun: one DDP step on this rank's half of a fixed batch; rank 0 checks the gradients
against a single-process step on the whole batch and writes OUT/grads_ok (or raises).

BatchNorm layers run in eval mode here: in training mode each rank normalizes with its own
batch statistics (by design, unless SyncBatchNorm on CUDA), which the whole-batch step does not.
"""
import copy
import sys

import torch
import torch.nn.functional as F

from fastres.distributed import Dist
from fastres.model import resnet

out = sys.argv[1]
d = Dist.from_env("cpu")
torch.manual_seed(0)
model = resnet(8)
single = copy.deepcopy(model)
g = torch.Generator().manual_seed(1)
x, y = torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)
ddp = d.wrap(model, torch.device("cpu"))
ddp.eval()  # BN with running statistics: the function is then the same per sample
half = slice(d.rank * 8, (d.rank + 1) * 8)
F.cross_entropy(ddp(x[half]), y[half]).backward()
if d.rank == 0:
    single.eval()
    F.cross_entropy(single(x), y).backward()
    for (n, p), q in zip(model.named_parameters(), single.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=n)
    open(f"{out}/grads_ok", "w").write("ok")
d.close()
