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


def test_cli_export_of_a_tiny_model_with_metadata_fusion(tmp_path):
    """BERT-style backbone, mean pooling, Linear projection, item metadata fusion (folded into the bias),
    max_statement_length truncation (the long text), through the `uue export sentence-transformers` command.
    It prints nothing alarming: no LOAD REPORT listing BERT's unused pooler as MISSING."""
    import subprocess
    import sys
    from pathlib import Path

    _saved(tmp_path / "run" / "model", use_item_metadata=True)
    out = tmp_path / "st"
    command = [sys.executable, str(Path(sys.executable).parent / "uue"), "export", "sentence-transformers",
               "--checkpoint", str(tmp_path / "run"), "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SentenceTransformer(" in done.stdout
    printed = done.stdout + done.stderr
    assert not any(word in printed for word in ("LOAD REPORT", "MISSING", "newly initialized")), printed
    assert _cosines(out, tmp_path / "run" / "model").min() >= 0.9999
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "not empty" in again.stderr  # never overwrites an export


def test_export_fails_loudly_when_the_backbone_does_not_load_as_saved(tmp_path):
    """A backbone file missing a weight (transformers would initialise it at random and only warn) or holding
    one the model has no place for fails the export, naming the weights."""
    from safetensors.torch import load_file, save_file

    from uue.model.export import export_sentence_transformers

    _saved(tmp_path / "model")
    weights_file = tmp_path / "model" / "item_tower" / "backbone" / "model.safetensors"
    weights = load_file(weights_file)
    weights["encoder.layer.0.attention.self.querry.weight"] = weights.pop("encoder.layer.0.attention.self.query.weight")
    save_file(weights, weights_file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"querry.weight: saved but not in the model \(unexpected\).*"
                                         r"query.weight: not saved, initialised at random \(missing\)"):
        export_sentence_transformers(tmp_path / "model", tmp_path / "st")


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
