"""Symmetric InfoNCE over users and their positives, with negatives gathered across workers.

A batch is user-centric: B users (one history encoding each) and M = B x positives_per_user statement
slots, slot m belonging to user `item_owner[m]` (`item_valid` is False for the slots of users with fewer
positives). Each worker scores its local rows against the columns of every worker (open_clip's
`local_loss=True, gather_with_grad=True`):

- user -> statement: one row per valid slot, its owner's vector against every slot's statement in the
  global batch (+ the owner's sampled negatives); the target is the slot's own column;
- statement -> user: one row per valid slot, the statement against every user of the global batch; the
  target is the owner.

A column that is a positive of the row's user (the user's other drawn positives, or any statement in the
user's full training positives, wherever in the global batch it sits) is masked out, never pushed apart.
The loss is a sum over the valid slots of every worker divided by their global count (times the world size,
because DeepSpeed/DDP average gradients over workers), so N workers equal one worker with the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from uue.train.stream import TrainBatch
from uue.train.distributed import all_gather_no_grad, all_gather_with_grad, rank_and_world


@dataclass
class EncodedBatch:
    """The vectors of one training batch; the losses read them."""

    user: torch.Tensor  # (B, D) unit vectors
    item: torch.Tensor  # (M, D) unit vectors of the batch's positive slots (M = B x positives per user)
    logit_scale: torch.Tensor  # (1,) exp of the clamped log-scale
    negatives: torch.Tensor | None = None  # (B, K, D) sampled negative statements per user
    negative_ids: torch.Tensor | None = None  # (B, K) their statement indices
    label_items: torch.Tensor | None = None  # (B, K, D) statements drawn from each user's labels (label loss)
    label_values: torch.Tensor | None = None  # (B, K) their 0/1 labels
    label_mask: torch.Tensor | None = None  # (B, K) which draws are real
    label_bias: torch.Tensor | None = None  # (1,) the label loss's learned bias
    anchors: torch.Tensor | None = None  # (K, D) distillation anchors through the item tower (uue.train.distill)
    teacher_anchors: torch.Tensor | None = None  # (K, H) the untrained model's unit vectors of those anchors
    teacher_users: torch.Tensor | None = None  # (B, H) the users' pooled content, no gradient (UserTower.content)
    extra_item_tokens: torch.Tensor | int = 0
    """Tokens the item tower ran on beyond the batch's own statements (negatives, label draws): the loop's
    tokens/s and MFU count them (a device tensor, read with the step's other metrics)."""


def positive_columns(user_positives: torch.Tensor, column_statements: torch.Tensor) -> torch.Tensor:
    """(B, K) statement indices of each user's positives (-1 = padding) x (N,) column statements ->
    (B, N) whether the column is a positive of the user."""
    return (user_positives[:, :, None] == column_statements[None, None, :]).any(1)


class InfoNCELoss(nn.Module):
    """(user->statement CE + statement->user CE) / 2 over valid slots, plus sampled negatives as extra columns."""

    def forward(self, out: EncodedBatch, batch: TrainBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        rank, world = rank_and_world()
        users, items = out.user, out.item
        b, m = users.size(0), items.size(0)
        device = users.device
        owner = batch.item_owner.long()
        valid = batch.item_valid.bool()
        statements = batch.statement_index.long()

        all_items = all_gather_with_grad(items)
        all_users = all_gather_with_grad(users)
        all_statements = all_gather_no_grad(statements)
        all_valid = all_gather_no_grad(valid.to(torch.uint8)).bool()
        # Local users x global slots, gathered so that the statement->user rows can read any user's column.
        is_positive = positive_columns(batch.user_positives.long(), all_statements)
        all_is_positive = all_gather_no_grad(is_positive.to(torch.uint8)).bool()

        rows = torch.arange(m, device=device)
        own_column = rank * m + rows
        owner_column = rank * b + owner
        scale = out.logit_scale.to(users.dtype)
        row_users = users[owner]

        not_negative = is_positive[owner] | ~all_valid[None, :]
        not_negative[rows, own_column] = False
        user_logits = (scale * row_users @ all_items.T).masked_fill(not_negative, float("-inf"))
        if out.negatives is not None:
            negative_logits = scale * torch.einsum("md,mkd->mk", row_users, out.negatives[owner])
            user_logits = torch.cat([user_logits, negative_logits], dim=1)

        not_user_negative = all_is_positive[:, own_column].T.clone()
        not_user_negative[rows, owner_column] = False
        item_logits = (scale * items @ all_users.T).masked_fill(not_user_negative, float("-inf"))

        weights = valid.to(torch.float32)
        total = all_valid.sum().clamp(min=1).to(torch.float32)
        loss_u2s = (F.cross_entropy(user_logits.float(), own_column, reduction="none") * weights).sum() / total
        loss_s2u = (F.cross_entropy(item_logits.float(), owner_column, reduction="none") * weights).sum() / total
        loss = (loss_u2s + loss_s2u) / 2 * world
        with torch.no_grad():
            local = weights.sum().clamp(min=1)
            metrics = {
                "loss_user_to_statement": loss_u2s.detach() * world,
                "loss_statement_to_user": loss_s2u.detach() * world,
                "accuracy": ((user_logits.argmax(1) == own_column).float() * weights).sum() / local,
                "logit_scale": out.logit_scale.detach().reshape(()),
                "masked_false_negatives": (not_negative & valid[:, None]).sum().float(),
                "positives_in_batch": weights.sum(),
            }
        return loss, metrics
