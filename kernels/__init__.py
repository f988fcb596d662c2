"""Triton kernels for fastres. Import needs triton; on CPU set TRITON_INTERPRET=1 first."""
from .bn_relu import (BatchNormAddReLU2d, BatchNormReLU2d, FusedNorm, bn_act, bn_act_fwd, bn_act_bwd,
                      bn_act_reference)

__all__ = ["BatchNormAddReLU2d", "BatchNormReLU2d", "FusedNorm", "bn_act", "bn_act_fwd", "bn_act_bwd",
           "bn_act_reference"]
