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


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather whose backward all-reduces the gathered gradient and keeps this rank's slice.

    Built on the public, synchronous collectives (`all_gather`, `all_reduce`), which every backend
    (NCCL, gloo) implements; the gradient is a few batch x dim floats, so an all-reduce in place of a
    reduce-scatter costs nothing measurable.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        world = dist.get_world_size()
        ctx.rank, ctx.rows = dist.get_rank(), tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        summed = grad_output.contiguous().clone()
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        return summed[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from every rank along dim 0; gradients flow back to each rank's slice.

    Every rank must pass the same number of rows. Backward sums the gradient of every rank's loss
    w.r.t. this rank's slice, so averaging parameter gradients across ranks afterwards equals the
    gradient of one big batch.
    """
    if not is_distributed() or dist.get_world_size() == 1:
        return tensor
    return _AllGatherWithGrad.apply(tensor)


@torch.no_grad()
def all_gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` (ids, masks) from every rank along dim 0, without autograd."""
    if not is_distributed() or dist.get_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)
