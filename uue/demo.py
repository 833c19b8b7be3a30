"""The demo: train the embedded default briefly, then show which statements fit which users."""

from __future__ import annotations

import numpy as np

from uue.config import REPO_ROOT, load_config
from uue.inference import UUEInference
from uue.training import UUETrainer

DEFAULT_CONFIG = REPO_ROOT / "configs" / "minilm.yaml"


def run_demo(config_path: str | None = None, overrides: list[str] | None = None) -> None:
    config = load_config(config_path or DEFAULT_CONFIG, overrides)
    print(f"[1/3] training {config.model.user_model_name} towers on {config.data.path}")
    trainer = UUETrainer(config)
    result = trainer.fit()
    print(f"      {result.steps} steps, loss {result.history[0]['loss']:.3f} -> {result.history[-1]['loss']:.3f}")

    print("[2/3] user/statement similarities on held-out test users")
    inference = UUEInference(trainer.model)
    dataset = trainer.dataset
    test_users = sorted({lab.user_id for lab in dataset.labels_in("test")})[:4]
    statements = [dataset.statements[s] for s in sorted(dataset.statements)]
    user_vectors = inference.encode_users([dataset.users[u] for u in test_users])
    statement_vectors = inference.encode_statements(statements)
    scores = user_vectors @ statement_vectors.T
    for user_id, row in zip(test_users, scores, strict=True):
        true = {lab.statement_id for lab in dataset.labels if lab.user_id == user_id and lab.label == 1}
        top = np.argsort(-row)[:3]
        shown = ", ".join(
            f"{statements[i].text!r} {row[i]:+.2f}{' (true)' if statements[i].statement_id in true else ''}"
            for i in top
        )
        print(f"      {user_id}: {shown}")

    print("[3/3] zero-shot: a statement never seen in training")
    novel = "would enjoy reading a statistics textbook"
    vector = inference.get_statement_embedding(novel)
    best = int(np.argmax(user_vectors @ vector))
    print(f"      {novel!r}: best-fitting test user {test_users[best]} ({float(user_vectors[best] @ vector):+.2f})")
    print(f"model saved to {result.model_dir}")
