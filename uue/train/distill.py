"""Learning without forgetting: keep how the pretrained space ranks users on texts from the users' own histories.

Training moves the towers toward the statements it has labels for; on a kind of statement it has none for, what
answers is whatever the pretrained space knew, after the heads have moved it. This term keeps that knowledge as a
constraint rather than a starting point. Its anchors are texts drawn from the training users' history chunks
(label-free, from the data itself: what users write about is what they will be asked about), encoded as
statements. For each anchor, the trained model's scores over the batch's users must correlate with the teacher's:
`1 - Pearson correlation` over the users, averaged over anchors. A correlation ignores each anchor's offset and
scale, so the label loss stays free to set how often a kind of statement is true; what is kept is which users an
anchor fits better.

The teacher scores an anchor by the cosine between the frozen item backbone's anchor vector and the user's pooled
chunk content (`UserTower.content`, no gradient): the mean of the frozen chunk vectors, i.e. the untrained
baseline, or with `chunk_weight_rank` the mean of the chunks weighted as the tower currently weighs them, which is
still in the backbone's space. So the free-form parts (chunk adapter, heads) must keep what the content says,
while what the pool learns about which chunks count is kept too. The teacher costs nothing beyond the caches,
which is why the term needs both backbones frozen and cached (`model.loss.distill_weight`). The training
objective (uue.train.objective) runs the anchors through the item tower with the step's other statements and
adds this term.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from uue.data.featurize import Featurizer
from uue.model.inputs import StatementBatch

SCAN_FACTOR = 20
"""Distinct chunks read before the draw stops: the anchors are a uniform draw among the first count x 20."""


def history_anchor_texts(user_batches: Iterable[list[dict[str, Any]]], featurizer: Featurizer, count: int,
                         seed: int) -> list[str]:
    """`count` distinct history chunks of training users, as text, drawn with a seeded reservoir.

    Chunks are stored as the user tokenizer's ids; they are decoded (special tokens and the "[platform]" prefix
    dropped) so that the item tower reads them with its own tokenizer.
    """
    rng = np.random.default_rng(seed)
    seen: set[tuple[int, ...]] = set()
    reservoir: list[tuple[int, ...]] = []
    for rows in user_batches:
        if len(seen) >= SCAN_FACTOR * count:  # enough candidates: a huge corpus is not read through for anchors
            break
        for row in rows:
            for tokens in row["chunk_tokens"]:
                key = tuple(int(t) for t in tokens)
                if key in seen:
                    continue
                seen.add(key)
                if len(reservoir) < count:
                    reservoir.append(key)
                else:
                    slot = int(rng.integers(len(seen)))
                    if slot < count:
                        reservoir[slot] = key
    texts = []
    for tokens in reservoir:
        text = featurizer.user_tokenizer.decode(list(tokens), skip_special_tokens=True).strip()
        if text.startswith("[") and "]" in text:  # chunk_text's "[platform] " prefix
            text = text.split("]", 1)[1].strip()
        if text:
            texts.append(text)
    if not texts:
        raise ValueError("distillation found no history text among the training users")
    return texts


BANK_FILE = Path(__file__).resolve().parent.parent / "data" / "anchor_statements.txt"


def bank_anchor_texts(path: str | Path = BANK_FILE) -> list[str]:
    """The statements of a bank file: one per line; blank lines and lines starting with '#' are skipped."""
    texts = [line.strip() for line in Path(path).read_text().splitlines()]
    texts = [t for t in texts if t and not t.startswith("#")]
    if not texts:
        raise ValueError(f"{path}: no statements (one per line)")
    return texts


class AnchorSampler:
    """Draws `per_step` anchors per step: the statements the student's item tower reads (the frozen backbone's
    vectors) and the teacher's unit vectors of them."""

    def __init__(self, statements: StatementBatch, teacher_vectors: np.ndarray | torch.Tensor, per_step: int,
                 seed: int = 0):
        self.statements = statements
        self.teacher = F.normalize(torch.as_tensor(teacher_vectors, dtype=torch.float32), dim=-1)
        self.per_step = min(per_step, len(self.teacher))
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self, device: torch.device) -> tuple[StatementBatch, torch.Tensor]:
        picks = torch.randperm(len(self.teacher), generator=self.generator)[: self.per_step]
        return self.statements.rows(picks).to(device), self.teacher[picks].to(device)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def distillation_loss(users: torch.Tensor, anchors: torch.Tensor, teacher_user_vectors: torch.Tensor,
                      teacher_anchor_vectors: torch.Tensor) -> torch.Tensor:
    """1 - the Pearson correlation over users between student and teacher scores, averaged over anchors.

    users (B, D) and anchors (K, D) are the student's unit vectors; the teacher's are (B, H) and (K, H).
    """
    student = users.float() @ anchors.float().T  # (B, K)
    teacher = teacher_user_vectors.float() @ teacher_anchor_vectors.float().T
    student = student - student.mean(0, keepdim=True)
    teacher = teacher - teacher.mean(0, keepdim=True)
    correlation = (student * teacher).sum(0) / (student.norm(dim=0) * teacher.norm(dim=0)).clamp(min=1e-8)
    return 1.0 - correlation.mean()
