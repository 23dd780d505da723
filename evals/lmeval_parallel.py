"""lm-evaluation-harness's own data-parallel mode on a ready (patched) model.

lm-eval splits the work itself: `lm_eval.evaluator.evaluate` builds each rank's requests
with `task.build_all_requests(rank=lm.rank, world_size=lm.world_size)` (every
world_size-th document), pads the ranks to equal request counts with `lm.all_gather`,
waits at `lm.barrier()`, and gathers every rank's per-document metrics to rank 0 with
`lm.gather_object` before aggregating (lm_eval/evaluator.py, lm_eval 0.4.x; `LM` in
lm_eval/api/model.py names these five members as the ones to override "if relying on the
evaluator() for data-parallel distribution of requests").

`HFLM` sets them from an `accelerate.Accelerator` only when it loads the model itself from
a path and sees more than one GPU (lm_eval/models/huggingface.py); given a ready model, as
ropelab's patched one, it runs as one process. `DataParallelHFLM` is `HFLM` on a ready
model whose five members come from the initialised torch.distributed process group
instead (torchrun's, or `accelerate launch`'s, which starts its processes through
torchrun), so the same split and gather run with gloo on CPU as with NCCL on GPUs.
lm-eval is imported at the top: import this module only where lm-eval is installed.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from lm_eval.models.huggingface import HFLM


class DataParallelHFLM(HFLM):
    """`HFLM(pretrained=model, ...)` taking its rank and world size from torch.distributed."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("DataParallelHFLM needs an initialised torch.distributed process group (torchrun)")
        self._rank = dist.get_rank()
        self._world_size = dist.get_world_size()

    def all_gather(self, tensor):
        """Every rank's `tensor` concatenated along dim 0 (a 0-d tensor counts as one element),
        as `accelerate.Accelerator.gather`, which lm-eval's callers expect. The collective runs on
        CPU copies: ropelab's CLI joins a gloo group (distributed.py), on GPUs as well, and lm-eval
        gathers only request counts and batch sizes this way."""
        flat = (tensor.reshape(1) if tensor.dim() == 0 else tensor).detach().cpu().contiguous()
        parts = [torch.empty_like(flat) for _ in range(self.world_size)]
        dist.all_gather(parts, flat)
        return torch.cat(parts).to(tensor.device)

    def gather_object(self, obj, dst=0):
        result = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, result, dst=dst)
        return result

    def barrier(self):
        dist.barrier()
