"""Honest throughput metrics: count only useful (non-padding) tokens, and say which FLOPs are counted.

MFU (model FLOPs utilisation) counts 6 N FLOPs per useful token (forward 2N + backward 4N, N = parameters
that multiply every token, input embeddings excluded; attention's score FLOPs are left out, as in the
usual 6N convention). HFU (hardware FLOPs utilisation) also counts what recomputation re-executes: with
activation checkpointing each token's forward runs twice, 8 N. Padding never counts: a padded step that
computes 2x the useful tokens shows half the MFU of a packed step at the same wall clock.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

H100_BF16_DENSE_FLOPS = 989e12  # also the H200 (same compute)


def useful_tokens(attention_mask: torch.Tensor | None = None, lengths: Iterable[int] | None = None) -> int:
    """Real tokens of a padded batch (its mask's ones) or of ragged sequences (their lengths)."""
    if (attention_mask is None) == (lengths is None):
        raise ValueError("pass exactly one of attention_mask or lengths")
    if attention_mask is not None:
        return int(attention_mask.sum())
    return int(sum(lengths))  # type: ignore[arg-type]


def _numel(param: torch.Tensor) -> int:
    """A parameter's full size, also under ZeRO-3 (where this rank holds an empty placeholder)."""
    return int(getattr(param, "ds_numel", param.numel()))


def non_embedding_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Parameters that multiply every token: all but the input embedding table (tied output heads count once)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    table = embeddings.weight if embeddings is not None else None
    return sum(_numel(p) for p in model.parameters()
               if p is not table and (p.requires_grad or not trainable_only))


def training_flops_per_token(backbone: nn.Module, recompute: bool) -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs) per useful token of one training step through `backbone`.

    Forward 2N over every weight, backward 4N over the trained ones (so 6N when all train, 2N when frozen);
    hardware adds the recomputed forward (2N) when activations are checkpointed and something trains.
    """
    total = non_embedding_parameters(backbone)
    trained = non_embedding_parameters(backbone, trainable_only=True)
    model_flops = 2.0 * total + 4.0 * trained
    return model_flops, model_flops + (2.0 * total if recompute and trained else 0.0)


def flops_per_token(parameters: int, recompute: bool = False) -> float:
    """Training FLOPs per token: 6N, or 8N when the forward is recomputed in backward (checkpointing)."""
    return (8.0 if recompute else 6.0) * parameters


def mfu(tokens_per_second: float, parameters: int, peak_flops: float = H100_BF16_DENSE_FLOPS) -> float:
    """Model FLOPs utilisation on useful tokens (6N), a fraction of `peak_flops`."""
    return flops_per_token(parameters) * tokens_per_second / peak_flops


def hfu(tokens_per_second: float, parameters: int, recompute: bool,
        peak_flops: float = H100_BF16_DENSE_FLOPS) -> float:
    """Hardware FLOPs utilisation: 8N per useful token with recomputation, else equal to MFU."""
    return flops_per_token(parameters, recompute) * tokens_per_second / peak_flops
