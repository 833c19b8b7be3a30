"""torch.distributed helpers: rank/world queries and all-gather with and without gradient."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from every rank along dim 0; gradients flow back to each rank's slice.

    Backward sums the gradient of every rank's loss w.r.t. this rank's slice (a reduce-scatter), so
    averaging parameter gradients across ranks afterwards equals the gradient of one big batch.
    """
    if not is_distributed() or dist.get_world_size() == 1:
        return tensor
    try:
        from torch.distributed._functional_collectives import all_gather_tensor_autograd

        gathered = all_gather_tensor_autograd(tensor.contiguous(), gather_dim=0, group=dist.group.WORLD)
        return gathered.wait() if hasattr(gathered, "wait") else gathered
    except (ImportError, RuntimeError, NotImplementedError):
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(tensor.contiguous()), dim=0)


@torch.no_grad()
def all_gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` (ids, masks) from every rank along dim 0, without autograd."""
    if not is_distributed() or dist.get_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)
