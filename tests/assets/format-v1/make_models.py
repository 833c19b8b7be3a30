"""Wrote the tiny model folders beside it with the code of main at 6975f70 (uue.json and tower.json dump the
flat 55-key ModelConfig of that time), plus the vectors that code gave for USERS and STATEMENTS:
`python tests/assets/format-v1/make_models.py tests/assets/format-v1` (with that code checked out).
tests/test_saved_format.py imports USERS and STATEMENTS from here; the writing part needs the old code."""
import sys
from pathlib import Path

from uue.data.schema import Statement, UserChunk, UserData

USERS = [
    UserData("u1", [UserChunk("I climbed the ridge at dawn", platform="forum", timestamp="2025-06-01T08:00:00Z"),
                    UserChunk("new hiking boots arrived")], metadata={"age": 31, "country": "uk"}),
    UserData("u2", [UserChunk("made fresh pasta tonight")], metadata={"age": 58}),
    UserData("u3", [UserChunk(t) for t in ("watched a horror film", "the sequel was worse", "popcorn again",
                                           "another scary night")]),
]
STATEMENTS = [
    Statement("s1", "loves hiking in the mountains", metadata={"family": "outdoors"}),
    Statement("s2", "enjoys cooking", context="asked in a survey"),
    Statement("s3", "is afraid of the dark"),
]
CONFIGS = {
    # the tiny preset with the seed defaults: attention pooling, a random Linear projection, metadata in both towers
    "attention-metadata": dict(user_model_name="tiny", item_model_name="tiny", embedding_dim=16, attention_heads=4,
                               max_chunk_length=32, max_statement_length=16, max_context_length=8,
                               num_chunks_per_user=8, batch_size=8, use_user_metadata=True, use_item_metadata=True,
                               metadata_dim=8, item_metadata_dim=8, label_loss_weight=1.0),
    # mean pooling, a chunk adapter, identity heads with a low-rank correction (GELU on the user side), frozen caches
    "lowrank-adapter": dict(user_model_name="tiny", item_model_name="tiny", embedding_dim=32, max_chunk_length=32,
                            max_statement_length=16, max_context_length=0, num_chunks_per_user=8, batch_size=8,
                            use_attention_pooling=False, chunk_adapter_rank=8, projection_init="identity",
                            projection_rank=4, user_projection_activation="gelu", freeze_user_backbone=True,
                            cache_chunk_vectors=True, freeze_item_backbone=True, cache_statement_vectors=True,
                            temperature=0.05),
}


def main(out: Path) -> None:
    import numpy as np
    import torch
    from uue.inference import UUEInference

    from uue.config import ModelConfig
    from uue.model.uue_model import UUEModel

    for name, fields in CONFIGS.items():
        config = ModelConfig(**fields)
        model = UUEModel.from_config(config, seed=3)
        generator = torch.Generator().manual_seed(11)
        with torch.no_grad():  # trained-looking heads: zero-initialised corrections would hide a mis-loaded weight
            for param_name, param in model.named_parameters():
                if ".encoder." not in param_name:
                    param.add_(0.1 * torch.randn(param.shape, generator=generator))
        folder = model.save_pretrained(out / name)
        inference = UUEInference(folder, device="cpu")
        np.savez(out / f"{name}-vectors.npz", users=inference.encode_users(USERS),
                 statements=inference.encode_statements(STATEMENTS),
                 logit_scale=np.float32(inference.logit_scale))
        print("wrote", folder)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
