"""The training objective: the model, its statement samplers and its losses, as the one module a step runs.

`TrainingObjective.forward(batch)` computes everything a step needs: it encodes the batch's users (each history
once), picks sampled negatives from the user vectors, draws each user's labelled statements and the step's
distillation anchors, runs the item tower once over the positives, negatives, label statements and anchors
together, and returns symmetric InfoNCE (+ the weighted label loss, + the weighted distillation term) with the
step's metrics. DeepSpeed wraps this module, so every use of the weights
happens inside one engine forward (what ZeRO-3 needs), and the model itself only encodes.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from uue.config import ModelConfig
from uue.model.encode import StatementBatchEncoder
from uue.model.inputs import StatementBatch
from uue.model.uue_model import UUEModel
from uue.train.distill import distillation_loss
from uue.train.label_loss import label_loss
from uue.train.loss import EncodedBatch, InfoNCELoss
from uue.train.profile import phase
from uue.train.samplers import Samplers
from uue.train.stream import TrainBatch

POOL_REFRESH_BATCH = 256
"""Statements per item-tower call when the negative pool is re-encoded."""


def autocast_for(device: torch.device, module: nn.Module | None = None):
    """bf16 autocast on CUDA; none on CPU (bf16 matmuls are slow and inexact there), and none over weights
    already in bf16 (a DeepSpeed bf16 engine): autocast would only add casts around every op."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    if module is not None and next(module.parameters()).dtype == torch.bfloat16:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16)


class TrainingObjective(nn.Module):
    """UUEModel + sampled negatives + InfoNCE + the label loss + distillation: what one training step computes."""

    def __init__(self, model: UUEModel, config: ModelConfig, samplers: Samplers | None = None):
        super().__init__()
        self.model = model
        self.samplers = samplers or Samplers()
        self.info_nce = InfoNCELoss()
        self.label_loss_weight = config.loss.label_loss_weight
        self.distill_weight = config.loss.distill_weight
        model.logit_scale.requires_grad_(config.loss.learn_temperature)
        model.label_bias.requires_grad_(self.label_loss_weight > 0)

    def encode(self, batch: TrainBatch) -> EncodedBatch:
        """Users, their positive slots, sampled negatives, label draws and distillation anchors -> vectors; the
        item tower runs once on all statements when they are of one kind (tokens padded to the widest)."""
        model = self.model
        with phase("user_tower"):
            users = model.encode_users(batch.users)
        with phase("item_tower"):  # drawing the statements, then the item tower
            return self._encode_items(batch, users)

    def _encode_items(self, batch: TrainBatch, users: torch.Tensor) -> EncodedBatch:
        model = self.model
        # Negatives are chosen from the user vectors and the refreshed pool, label statements and anchors drawn:
        # then the item tower runs once, on positives, negatives, label statements and anchors together.
        sets: dict[str, StatementBatch] = {}
        shapes: dict[str, tuple[int, ...]] = {}  # each set's leading dimensions
        negative_ids = draw = teacher_anchors = None
        samplers = self.samplers
        if samplers.negative is not None and samplers.negative.num_negatives > 0:
            negative_ids, sets["negatives"] = samplers.negative.sample(users.detach(), batch)
            shapes["negatives"] = tuple(negative_ids.shape)
        if samplers.label is not None:
            draw = samplers.label.sample(batch, users.device)
            sets["labels"], shapes["labels"] = draw.statements, tuple(draw.indices.shape)
        if samplers.anchor is not None:
            sets["anchors"], teacher_anchors = samplers.anchor.sample(users.device)
            shapes["anchors"] = (len(teacher_anchors),)
        extra_tokens: torch.Tensor | int = 0
        for statements in sets.values():  # hidden states count none (what backbone_tokens counts)
            if statements.text.kind == "tokens":
                extra_tokens = extra_tokens + statements.text.attention_mask.sum()
        vectors = self._encode_statements([batch.positives, *sets.values()])
        encoded = {name: v.view(*shapes[name], -1) for name, v in zip(sets, vectors[1:], strict=True)}
        out = EncodedBatch(users, vectors[0], model.clamped_logit_scale(), encoded.get("negatives"), negative_ids,
                           extra_item_tokens=extra_tokens)
        if draw is not None:
            out.label_items = encoded["labels"]
            out.label_values, out.label_mask, out.label_bias = draw.values, draw.mask, model.label_bias
        if teacher_anchors is not None:
            out.anchors, out.teacher_anchors = encoded["anchors"], teacher_anchors
            with torch.no_grad():
                out.teacher_users = model.user_tower.content(batch.users.chunks.vectors, batch.users.chunk_mask)
        return out

    def _encode_statements(self, parts: list[StatementBatch]) -> list[torch.Tensor]:
        """Several statement sets -> their vectors, in one item-tower call when they can share one."""
        tokenizer = self.model.item_tokenizer
        left = getattr(tokenizer, "padding_side", "right") == "left"
        together = StatementBatch.concatenate(parts, getattr(tokenizer, "pad_token_id", None) or 0, left)
        if together is None:
            return [self.model.encode_statements(part) for part in parts]
        return list(self.model.encode_statements(together).split([len(part) for part in parts]))

    def forward(self, batch: TrainBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, metrics) of one batch: symmetric InfoNCE over the users' positive slots (+ negatives), plus the
        weighted label loss and distillation term when they are on; `metrics["extra_item_tokens"]` counts the
        sampled statements' tokens."""
        out = self.encode(batch)
        with phase("loss"):  # InfoNCE with its all-gather of the columns, and the other terms
            return self._loss(out, batch)

    def _loss(self, out: EncodedBatch, batch: TrainBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, metrics = self.info_nce(out, batch)
        if out.label_items is not None:
            pointwise = label_loss(out.user, out.label_items, out.label_values, out.label_mask, out.logit_scale,
                                   out.label_bias)
            metrics["info_nce"] = loss.detach()
            metrics["label_loss"] = pointwise.detach()
            loss = loss + self.label_loss_weight * pointwise
        if out.anchors is not None:
            kept = distillation_loss(out.user, out.anchors, out.teacher_users, out.teacher_anchors)
            metrics["distill_loss"] = kept.detach()
            loss = loss + self.distill_weight * kept
        metrics["extra_item_tokens"] = out.extra_item_tokens
        return loss, metrics

    @torch.no_grad()
    def refresh_negatives(self, step: int) -> None:
        """Re-encode the statement pool with the current item tower when hard/semi-hard negatives are due."""
        sampler = self.samplers.negative
        if sampler is None or not sampler.needs_refresh(step):
            return
        device = next(self.parameters()).device
        encoder = StatementBatchEncoder(self.model.item_tower, device, batch_size=POOL_REFRESH_BATCH)
        was_training = self.training
        self.eval()
        with autocast_for(device, self):
            sampler.refresh(encoder.encode_pool, step)
        self.train(was_training)
