"""Towers: pooling semantics, masking, batch independence, metadata, freezing, memory bound, save/load."""

from __future__ import annotations

import pytest
import torch

from uue.config import ModelConfig
from uue.data.featurize import Featurizer, collate, trim_batch
from uue.data.schema import UserChunk, UserData
from uue.data.tokenizers import ModelNotAvailableError
from uue.model import StatementBatch, TowerInput, UserBatch, UUEModel, load_tower
from uue.model.backbone import load_backbone

TEXTS = ["Summited the ridge at dawn.", "Made fresh pasta tonight, the dough needed more rest than I thought.",
         "Jazz trio at the club.", "Beat the final boss after forty attempts."]


def _model(config: ModelConfig) -> UUEModel:
    return UUEModel.from_config(config).eval()


def _users_batch(model: UUEModel, users: list[UserData]) -> UserBatch:
    feat = Featurizer(model.config, model.user_tokenizer, model.item_tokenizer)
    return UserBatch.from_features(trim_batch(collate([feat.user_features(u) for u in users])))


def _vectors(vectors: torch.Tensor) -> TowerInput:
    return TowerInput(vectors=vectors)


@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen3"])
def test_padding_chunks_change_nothing(tiny_model_config, preset):
    model = _model(tiny_model_config.model_copy(update={"user_model_name": preset}))
    batch = _users_batch(model, [UserData("u", [UserChunk(t) for t in TEXTS[:2]])])
    plain = model.encode_users(batch)
    # Append 3 padding chunks full of (unmasked) garbage tokens: chunk_mask False must give them no weight.
    chunks = batch.chunks
    length = chunks.input_ids.shape[2]
    padded = UserBatch(
        TowerInput(torch.cat([chunks.input_ids, torch.randint(5, 200, (1, 3, length))], 1),
                   torch.cat([chunks.attention_mask, torch.ones(1, 3, length, dtype=torch.long)], 1)),
        torch.cat([batch.chunk_mask, torch.zeros(1, 3, dtype=torch.bool)], 1),
    )
    torch.testing.assert_close(model.encode_users(padded), plain)


@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen3"])
def test_user_vector_does_not_depend_on_other_users(tiny_model_config, preset):
    model = _model(tiny_model_config.model_copy(update={"user_model_name": preset}))
    alone = model.encode_users(_users_batch(model, [UserData("a", [UserChunk(TEXTS[2])])]))
    # In a batch with a user who has more and longer chunks (more padding for user a, in both dimensions).
    together = model.encode_users(_users_batch(model, [
        UserData("a", [UserChunk(TEXTS[2])]), UserData("b", [UserChunk(t) for t in TEXTS]),
    ]))
    torch.testing.assert_close(together[0:1], alone, atol=1e-5, rtol=1e-4)


def test_qwen3_path_uses_left_padding_and_last_token(tiny_model_config):
    model = _model(tiny_model_config.model_copy(update={"item_model_name": "tiny-qwen3"}))
    assert model.item_tokenizer.padding_side == "left"
    assert model.item_tower.encoder.pooling == "last_token"
    feat = Featurizer(model.config, model.user_tokenizer, model.item_tokenizer)
    features = feat.statement_features(["short", "a much longer statement text"])
    ids = torch.as_tensor(features["item_input_ids"])
    mask = torch.as_tensor(features["item_attention_mask"])
    assert bool((mask[:, -1] == 1).all())  # left padding: the last position is real in every row
    both = model.item_tower(TowerInput(ids, mask))
    alone = model.item_tower(TowerInput(ids[:1], mask[:1]))
    torch.testing.assert_close(both[:1], alone, atol=1e-5, rtol=1e-4)
    # last-token pooling reads the final hidden state of the backbone
    hidden = model.item_tower.encoder.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(model.item_tower.encoder(ids, mask), hidden[:, -1])


def test_encoder_presets_use_mean_pooling(tiny_model_config):
    model = _model(tiny_model_config)
    assert model.user_tower.encoder.pooling == "mean" and model.user_tokenizer.padding_side == "right"


def test_towers_have_separate_weights(tiny_model_config):
    model = _model(tiny_model_config)
    user_ptrs = {p.data_ptr() for p in model.user_tower.parameters()}
    assert not user_ptrs & {p.data_ptr() for p in model.item_tower.parameters()}


def test_user_metadata_changes_the_vector(tiny_model_config):
    model = _model(tiny_model_config.model_copy(update={"use_user_metadata": True}))
    chunks = [UserChunk(TEXTS[0])]
    a = model.encode_users(_users_batch(model, [UserData("u", chunks, metadata={"age": 25, "country": "uk"})]))
    b = model.encode_users(_users_batch(model, [UserData("u", chunks, metadata={"age": 61, "country": "de"})]))
    assert (a - b).abs().max() > 1e-3


def test_item_metadata_changes_the_vector(tiny_model_config):
    from uue.data.schema import Statement

    model = _model(tiny_model_config.model_copy(update={"use_item_metadata": True}))
    feat = Featurizer(model.config, model.user_tokenizer, model.item_tokenizer)
    rows = feat.statement_features([Statement("s", "likes jazz", metadata={"family": "music"}),
                                    Statement("s", "likes jazz", metadata={"family": "genre"})])
    vectors = model.encode_statements(StatementBatch.from_features(rows))
    assert (vectors[0] - vectors[1]).abs().max() > 1e-3


def test_attention_and_mean_pooling_differ(tiny_model_config):
    users = [UserData("u", [UserChunk(t) for t in TEXTS])]
    attn = _model(tiny_model_config)
    mean = _model(tiny_model_config.model_copy(update={"use_attention_pooling": False}))
    assert type(attn.user_tower.pooling).__name__ == "AttentionPooling"
    assert type(mean.user_tower.pooling).__name__ == "MeanChunkPooling"
    # mean pooling = mean of chunk vectors, before projection
    batch = _users_batch(mean, users)
    vectors = mean.user_tower.chunk_vectors(batch.chunks, batch.chunk_mask)
    pooled = mean.user_tower.pooling(vectors, batch.chunk_mask)
    torch.testing.assert_close(pooled, vectors.mean(1))


def test_chunk_adapter_starts_as_the_identity_and_reads_what_a_mean_of_chunks_cannot(tiny_model_config, tmp_path):
    cfg = tiny_model_config.model_copy(update={"use_attention_pooling": False, "chunk_adapter_rank": 8})
    model = _model(cfg)
    tower = model.user_tower
    hidden = tower.encoder.hidden_size
    generator = torch.Generator().manual_seed(0)
    film_a, film_b, loved = torch.randn(3, hidden, generator=generator)
    # Two users with the same mean chunk vector: one loved film a and not b, the other the reverse.
    vectors = torch.stack([torch.stack([film_a + loved, film_b - loved]),
                           torch.stack([film_a - loved, film_b + loved])])
    mask = torch.ones(2, 2, dtype=torch.bool)
    plain = _model(cfg.model_copy(update={"chunk_adapter_rank": 0}))
    plain.user_tower.load_state_dict({k: v for k, v in tower.state_dict().items() if "chunk_adapter" not in k})
    with torch.no_grad():
        torch.testing.assert_close(tower(_vectors(vectors), mask), plain.user_tower(_vectors(vectors), mask))
        first, second = plain.user_tower(_vectors(vectors), mask)
        torch.testing.assert_close(first, second)  # a mean of the chunks cannot tell them apart
    direction = torch.nn.functional.normalize(torch.randn(cfg.embedding_dim, generator=generator), dim=0)
    optimizer = torch.optim.Adam(tower.chunk_adapter.parameters(), lr=0.01)
    for _ in range(100):
        optimizer.zero_grad()
        users = tower(_vectors(vectors), mask)
        loss = (users[1] - users[0]) @ direction  # the adapter alone learns to separate them
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        users = tower(_vectors(vectors), mask)
    assert float((users[0] - users[1]) @ direction) > 0.5
    model.save_pretrained(tmp_path / "m")  # the adapter survives save and load
    torch.testing.assert_close(UUEModel.from_pretrained(tmp_path / "m").user_tower(_vectors(vectors), mask), users)


def _loss_and_grads(model: UUEModel, batch):
    model.train()
    model.zero_grad()
    model.encode_users(batch).sum().backward()


def test_frozen_backbone_gets_no_gradient(tiny_model_config):
    model = _model(tiny_model_config.model_copy(update={"freeze_user_backbone": True}))
    batch = _users_batch(model, [UserData("u", [UserChunk(t) for t in TEXTS])])
    _loss_and_grads(model, batch)
    assert all(p.grad is None for p in model.user_tower.encoder.parameters())
    assert model.user_tower.projection.weight.grad is not None


def test_top_n_layers_train_and_the_rest_is_frozen(tiny_model_config):
    model = _model(tiny_model_config.model_copy(update={"user_trainable_layers": 1}))
    batch = _users_batch(model, [UserData("u", [UserChunk(t) for t in TEXTS])])
    _loss_and_grads(model, batch)
    backbone = model.user_tower.encoder.backbone
    assert all(p.grad is None for p in backbone.embeddings.parameters())
    assert all(p.grad is None for p in backbone.encoder.layer[0].parameters())
    assert all(p.grad is not None for p in backbone.encoder.layer[1].parameters())


def test_micro_batching_gives_the_same_vectors(tiny_model_config):
    users = [UserData("u", [UserChunk(t) for t in TEXTS * 2])]
    big = _model(tiny_model_config)
    small = _model(tiny_model_config.model_copy(update={"encode_micro_batch": 1}))
    torch.testing.assert_close(small.encode_users(_users_batch(small, users)),
                               big.encode_users(_users_batch(big, users)))


def _saved_bytes_for_backward(model: UUEModel, chunks: int) -> int:
    """Bytes autograd keeps alive between forward and backward for one user of `chunks` chunks."""
    user = UserData("u", [UserChunk(TEXTS[i % len(TEXTS)] + " " * i) for i in range(chunks)])
    batch = _users_batch(model, [user])
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        seen[id(t)] = t.numel() * t.element_size()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.encode_users(batch).sum().backward()
    return sum(seen.values())


def test_training_memory_grows_by_chunk_vectors_not_activations(tiny_model_config):
    cfg = tiny_model_config.model_copy(update={"num_chunks_per_user": 64, "encode_micro_batch": 4})
    checkpointed = _model(cfg)
    plain = _model(cfg.model_copy(update={"gradient_checkpointing_chunks": False}))
    per_chunk_ckpt = (_saved_bytes_for_backward(checkpointed, 48) - _saved_bytes_for_backward(checkpointed, 16)) / 32
    per_chunk_plain = (_saved_bytes_for_backward(plain, 48) - _saved_bytes_for_backward(plain, 16)) / 32
    hidden, length = 32, cfg.max_chunk_length
    # Checkpointed: per extra chunk only its inputs (ids + mask), its vector and pooling state stay alive.
    assert per_chunk_ckpt <= 8 * 2 * length + 4 * hidden * 16
    assert per_chunk_plain > 5 * per_chunk_ckpt


def test_save_load_round_trip_and_single_tower_load(tiny_model_config, tmp_path):
    cfg = tiny_model_config.model_copy(update={"use_user_metadata": True, "item_model_name": "tiny-qwen3"})
    model = _model(cfg)
    with torch.no_grad():
        model.logit_scale.fill_(2.5)
    model.save_pretrained(tmp_path / "m")
    back = UUEModel.from_pretrained(tmp_path / "m").eval()
    for (name, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    batch = _users_batch(model, [UserData("u", [UserChunk(TEXTS[0])], metadata={"age": 3})])
    torch.testing.assert_close(model.encode_users(batch), back.encode_users(batch))
    tower, tokenizer = load_tower(tmp_path / "m" / "item_tower")
    assert tokenizer.padding_side == "left"
    feat = Featurizer(cfg, model.user_tokenizer, tokenizer)
    rows = StatementBatch.from_features(feat.statement_features(["likes jazz"]))
    torch.testing.assert_close(tower(rows.text), model.encode_statements(rows))


def test_backbone_folder_loads_with_plain_transformers(tiny_model_config, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    _model(tiny_model_config).save_pretrained(tmp_path / "m")
    assert AutoModel.from_pretrained(tmp_path / "m" / "user_tower" / "backbone").config.hidden_size == 32
    assert AutoTokenizer.from_pretrained(tmp_path / "m" / "user_tower" / "backbone")("hi")["input_ids"]


def test_heads_must_divide_hidden_size(tiny_model_config):
    with pytest.raises(ValueError, match="must divide"):
        UUEModel.from_config(tiny_model_config.model_copy(update={"attention_heads": 5}))


def test_missing_model_names_itself(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("UUE_QWEN3_EMBEDDING_PATH", raising=False)
    with pytest.raises(ModelNotAvailableError, match="Qwen/Qwen3-Embedding-0.6B.*UUE_QWEN3_EMBEDDING_PATH"):
        load_backbone("qwen3-embedding-0.6b")


def test_minilm_preset_loads_real_weights():
    from uue.model.backbone import TextEncoder

    backbone, tokenizer = load_backbone("minilm")
    encoder = TextEncoder(backbone).eval()
    texts = ["I love hiking in the mountains", "Mountain trekking is my passion", "The stock market fell today"]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        v = torch.nn.functional.normalize(encoder(enc["input_ids"], enc["attention_mask"]), dim=-1)
    assert backbone.config.hidden_size == 384 and len(tokenizer) == 30522
    # Real weights put the two hiking sentences much closer than hiking and finance; random ones would not.
    assert float(v[0] @ v[1]) > float(v[0] @ v[2]) + 0.3


def test_chunk_weight_starts_as_the_identity_and_only_rescales_each_chunk(tiny_model_config, tmp_path):
    cfg = tiny_model_config.model_copy(update={"use_attention_pooling": False, "chunk_weight_rank": 4})
    model = _model(cfg)
    tower = model.user_tower
    generator = torch.Generator().manual_seed(1)
    vectors = torch.randn(3, 5, tower.encoder.hidden_size, generator=generator)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[2, 3:] = False
    plain_mean = torch.nn.functional.normalize((vectors * mask[..., None]).sum(1) / mask.sum(1, keepdim=True), dim=-1)
    torch.testing.assert_close(tower.content(vectors, mask), plain_mean)  # untrained: the baseline's user vector
    optimizer = torch.optim.Adam(tower.chunk_weight.parameters(), lr=0.05)
    for _ in range(20):  # any training: push the pooled vectors somewhere
        optimizer.zero_grad()
        tower.content(vectors, mask)[:, 0].sum().backward()
        optimizer.step()
    with torch.no_grad():
        weighted = tower.chunk_weight(vectors)
        scale = (weighted * vectors).sum(-1) / (vectors * vectors).sum(-1)
        torch.testing.assert_close(weighted, scale[..., None] * vectors)  # each chunk keeps its direction
        assert float(scale.std()) > 1e-3  # and the chunks now count differently
    model.save_pretrained(tmp_path / "m")
    reloaded = UUEModel.from_pretrained(tmp_path / "m").user_tower
    torch.testing.assert_close(reloaded.content(vectors, mask), tower.content(vectors, mask))


def test_a_line_many_users_share_runs_the_per_chunk_modules_once_with_the_same_vectors_and_gradients(
        tiny_model_config):
    """Cached chunk vectors repeat (a film and its rating in many MovieLens histories): the chunk weight and the
    chunk adapter run once per distinct row, and the user vectors and every gradient equal running them per row."""
    cfg = tiny_model_config.model_copy(update={"use_attention_pooling": False, "chunk_adapter_rank": 8,
                                               "chunk_weight_rank": 4})
    tower = _model(cfg).user_tower
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # trained-looking modules: the zero-initialised output layers made non-zero
        for layer in (tower.chunk_adapter.up, tower.chunk_weight.up):
            layer.weight.normal_(0.0, 0.3, generator=generator)
    lines = torch.randn(5, tower.encoder.hidden_size, generator=generator)
    picks = torch.randint(0, 5, (4, 9), generator=generator)
    mask = torch.ones(4, 9, dtype=torch.bool)
    mask[3, 6:] = False
    vectors = lines[picks] * mask[..., None]  # padding rows are zero, as the collator pads
    seen: list[int] = []
    hook = tower.chunk_adapter.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[:-1].numel()))
    results = []
    for given in (vectors, vectors.clone().requires_grad_(True)):  # an input with a gradient is read row by row
        tower.zero_grad()
        out = tower.pool(given, mask, None)
        out.pow(2).mul(torch.arange(out.size(-1))).sum().backward()
        results.append((out.detach(), {name: p.grad.clone() for name, p in tower.named_parameters()
                                       if p.grad is not None}))
    hook.remove()
    assert seen == [6, 36]  # 5 lines and the padding row, against every slot
    (distinct_out, distinct_grads), (row_out, row_grads) = results
    torch.testing.assert_close(distinct_out, row_out)
    assert distinct_grads.keys() == row_grads.keys() and any(".up." in name for name in row_grads)
    for name, grad in row_grads.items():
        torch.testing.assert_close(distinct_grads[name], grad, msg=name)
