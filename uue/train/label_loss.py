"""The pointwise label loss: binary cross-entropy on each batch user's own labelled statements.

InfoNCE with in-batch negatives learns which statement fits a user better than the others in the
batch; every score is relative, so a statement that is true of most users ("enjoys drama movies") and
one true of few ("works as a lawyer") end up on the same footing. The training split also says which
statements are *false* of a user (label 0). This loss draws, for every user of the batch, statements
from that user's labels as they occur (1 and 0 alike, uniformly with replacement) and fits
`logit_scale * cosine + bias` to the label, so that scores also carry how often a kind of statement is
true. The bias is the model's `label_bias` parameter; the weight is `model.loss.label_loss_weight`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from uue.model.inputs import StatementBatch, StatementPool

if TYPE_CHECKING:
    from uue.train.stream import TrainBatch


@dataclass
class LabelDraw:
    """The labelled statements drawn for one batch: (B, K) pool indices, 0/1 values, which are real, and the
    B x K statements."""

    indices: torch.Tensor
    values: torch.Tensor
    mask: torch.Tensor
    statements: StatementBatch


class UserLabelSampler:
    """Draws `per_user` of each batch user's labelled statements (pool index, 0/1) and gathers them.

    The labels travel with the batch (`label_statements`, `label_values`: the user's training-split labels
    as statement indices, padded with -1), so no process holds every user's labels.
    """

    def __init__(self, per_user: int, pool: StatementPool, seed: int = 0):
        if per_user < 1:
            raise ValueError(f"labels_per_user must be >= 1, got {per_user}")
        self.per_user = per_user
        self.pool = pool
        self.pool_size = len(pool)
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self, batch: TrainBatch, device: torch.device) -> LabelDraw:
        """Users without labels get masked-out rows (they add nothing to the loss)."""
        statements = batch.label_statements.cpu().long()
        values = batch.label_values.cpu()
        rows = len(statements)
        indices = torch.zeros(rows, self.per_user, dtype=torch.long)
        drawn = torch.zeros(rows, self.per_user)
        mask = torch.zeros(rows, self.per_user, dtype=torch.bool)
        for row in range(rows):
            real = (statements[row] >= 0).nonzero().squeeze(1)
            if real.numel() == 0:
                continue
            if int(statements[row, real].max()) >= self.pool_size:
                raise ValueError(f"a labelled statement index is outside the pool of {self.pool_size}")
            picks = real[torch.randint(len(real), (self.per_user,), generator=self.generator)]
            indices[row], drawn[row], mask[row] = statements[row, picks], values[row, picks].float(), True
        return LabelDraw(indices.to(device), drawn.to(device), mask.to(device), self.pool.gather(indices).to(device))

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def label_loss(user: torch.Tensor, label_items: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
               logit_scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy over the real draws; `user` (B, D), `label_items` (B, K, D) unit vectors."""
    logits = logit_scale * torch.einsum("bd,bkd->bk", user, label_items) + bias
    weights = mask.to(logits.dtype)
    losses = F.binary_cross_entropy_with_logits(logits.float(), values.float(), reduction="none")
    return (losses * weights).sum() / weights.sum().clamp(min=1.0)
