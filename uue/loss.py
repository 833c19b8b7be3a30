"""Symmetric InfoNCE over users and statements, with negatives gathered across workers.

Each worker scores its local rows against the columns of every worker (open_clip's `local_loss=True,
gather_with_grad=True`), so the negatives of a step are the global batch while each worker only builds
a (b x N*b) logit block. Columns that are not real negatives (the same statement, or the same user, as
the row's positive pair) are masked out instead of being pushed apart.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from uue.distributed import all_gather_no_grad, all_gather_with_grad, rank_and_world
from uue.model.uue_model import UUEOutput


class InfoNCELoss(nn.Module):
    """(user->statement CE + statement->user CE) / 2, plus sampled negatives as extra user->statement columns."""

    def forward(
        self, out: UUEOutput, user_ids: torch.Tensor, statement_ids: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        rank, _ = rank_and_world()
        local = out.user.size(0)
        all_items = all_gather_with_grad(out.item)
        all_users = all_gather_with_grad(out.user)
        all_statement_ids = all_gather_no_grad(statement_ids)
        all_user_ids = all_gather_no_grad(user_ids)
        labels = torch.arange(local, device=out.user.device) + rank * local
        scale = out.logit_scale.to(out.user.dtype)

        # A column is a false negative when it carries this row's statement or this row's user: both
        # say "this statement is true of this user".
        same_pair = (statement_ids[:, None] == all_statement_ids[None, :]) | (
            user_ids[:, None] == all_user_ids[None, :]
        )
        same_pair[torch.arange(local, device=same_pair.device), labels] = False

        user_logits = scale * out.user @ all_items.T
        user_logits = user_logits.masked_fill(same_pair, float("-inf"))
        if out.negatives is not None:
            negative_logits = scale * torch.einsum("bd,bkd->bk", out.user, out.negatives)
            user_logits = torch.cat([user_logits, negative_logits], dim=1)
        item_logits = (scale * out.item @ all_users.T).masked_fill(same_pair, float("-inf"))

        loss_u2s = F.cross_entropy(user_logits.float(), labels)
        loss_s2u = F.cross_entropy(item_logits.float(), labels)
        loss = (loss_u2s + loss_s2u) / 2
        with torch.no_grad():
            metrics = {
                "loss_user_to_statement": loss_u2s.detach(),
                "loss_statement_to_user": loss_s2u.detach(),
                "accuracy": (user_logits.argmax(1) == labels).float().mean(),
                "logit_scale": out.logit_scale.detach().reshape(()),
                "masked_false_negatives": same_pair.sum().float(),
            }
        return loss, metrics
