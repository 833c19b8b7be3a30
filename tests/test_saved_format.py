"""Model folders written by earlier code still load and give the vectors that code gave.

tests/assets/format-v1/ holds two tiny models saved by main at 6975f70 (make_models.py there wrote them): their
uue.json and tower.json dump the flat 55-key ModelConfig of that time, and *-vectors.npz holds the vectors
that code computed for make_models.py's users and statements.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

ASSETS = Path(__file__).resolve().parent / "assets" / "format-v1"
MODELS = ("attention-metadata", "lowrank-adapter")


def _written_inputs():
    """USERS and STATEMENTS of the script that wrote the assets."""
    spec = importlib.util.spec_from_file_location("format_v1_models", ASSETS / "make_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.USERS, module.STATEMENTS


@pytest.mark.parametrize("name", MODELS)
def test_a_model_saved_by_the_old_code_gives_the_same_vectors(name):
    from uue import UUEInference

    users, statements = _written_inputs()
    expected = np.load(ASSETS / f"{name}-vectors.npz")
    inference = UUEInference(ASSETS / name, device="cpu")
    np.testing.assert_allclose(inference.encode_users(users), expected["users"], atol=1e-6)
    np.testing.assert_allclose(inference.encode_statements(statements), expected["statements"], atol=1e-6)
    assert inference.logit_scale == pytest.approx(float(expected["logit_scale"]))


@pytest.mark.parametrize("name", MODELS)
def test_each_old_tower_loads_alone_in_the_serving_encoders(name):
    from uue.serving.encoders import StatementEncoder, UserEncoder

    users, statements = _written_inputs()
    expected = np.load(ASSETS / f"{name}-vectors.npz")
    np.testing.assert_allclose(UserEncoder(ASSETS / name, device="cpu").encode(users), expected["users"], atol=1e-6)
    vectors, _ = StatementEncoder(ASSETS / name, device="cpu").encode(statements)
    np.testing.assert_allclose(vectors, expected["statements"], atol=1e-6)


def test_a_model_saved_now_records_only_what_using_it_needs(tiny_model_config, tmp_path):
    import json

    from uue.model import UUEModel

    config = tiny_model_config.model_copy(update={"batch_size": 3, "label_loss_weight": 2.0, "projection_rank": 0})
    folder = UUEModel.from_config(config).save_pretrained(tmp_path / "m")
    for meta in (json.loads((folder / "uue.json").read_text()),
                 json.loads((folder / "user_tower" / "tower.json").read_text())):
        assert meta["version"] == 2
        assert set(meta["model_config"]) == {"towers", "pooling", "heads", "packing", "loss"}
        assert meta["model_config"]["loss"] == {"max_logit_scale": 100.0}  # how training went is not recorded
    assert UUEModel.from_pretrained(folder).config.saved() == config.saved()
