"""`uue export sentence-transformers`: a folder SentenceTransformer loads, encoding statements as the item tower."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from uue.config import ModelConfig
from uue.model import UUEModel
from uue.model.inference import UUEInference

TEXTS = ["loves hiking in the mountains", "enjoys cooking at home",
         "would enjoy a late-night horror film with friends, popcorn and the lights off", "x"]


def _saved(folder, **overrides) -> UUEModel:
    config = ModelConfig(**{"user_model_name": "tiny", "item_model_name": "tiny", "embedding_dim": 16,
                            "attention_heads": 4, "max_chunk_length": 32, "max_statement_length": 12,
                            "num_chunks_per_user": 4, **overrides})
    model = UUEModel.from_config(config, seed=11)
    with torch.no_grad():  # a "trained" head: every part of the projection moves the vectors
        for p in model.item_tower.projection.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(folder)
    return model


def _cosines(exported_dir, model_dir) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(exported_dir), device="cpu")
    got = st.encode(TEXTS, convert_to_numpy=True, batch_size=2)  # batches pad differently: same vectors
    want = UUEInference(model_dir, device="cpu").encode_statements(TEXTS)
    assert got.shape == want.shape
    return (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)


def test_cli_export_of_a_tiny_model_with_metadata_fusion(tmp_path, capsys):
    """BERT-style backbone, mean pooling, Linear projection, item metadata fusion (folded into the bias),
    max_statement_length truncation (the long text), through `uue export sentence-transformers`."""
    from uue.cli import main

    _saved(tmp_path / "run" / "model", use_item_metadata=True)
    out = tmp_path / "st"
    command = ["export", "sentence-transformers", "--checkpoint", str(tmp_path / "run"), "--out", str(out)]
    assert main(command) == 0
    assert "SentenceTransformer(" in capsys.readouterr().out
    assert _cosines(out, tmp_path / "run" / "model").min() >= 0.9999
    assert main(command) == 2 and "not empty" in capsys.readouterr().err  # never overwrites an export


def test_export_of_a_decoder_with_a_low_rank_head(tmp_path):
    """Qwen3-style decoder, last-token pooling with left padding, low-rank residual projection."""
    from uue.model.export import export_sentence_transformers

    _saved(tmp_path / "model", user_model_name="tiny-qwen3", item_model_name="tiny-qwen3", embedding_dim=32,
           projection_rank=4)
    export_sentence_transformers(tmp_path / "model", tmp_path / "st")
    assert _cosines(tmp_path / "st", tmp_path / "model").min() >= 0.9999


def test_export_names_a_folder_that_is_not_a_model(tmp_path):
    from uue.model.export import export_sentence_transformers

    with pytest.raises(FileNotFoundError, match="not a saved UUE model folder"):
        export_sentence_transformers(tmp_path, tmp_path / "st")
