"""Hugging Face backbones: offline-friendly loading (presets: uue.data.tokenizers), pooling by backbone kind,
freezing, and splitting a backbone at a block.

A backbone is any `AutoModel` text encoder. Decoder embedders (Qwen3-Embedding) are read at the last
token with left padding; BERT-style encoders (MiniLM) by a masked mean over tokens.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from uue.data.tokenizers import (
    PRESETS,
    QWEN3_EMBEDDING_HUB_NAME,
    RANDOM_PRESETS,
    ModelNotAvailableError,
    build_byte_tokenizer,
    is_decoder,
    resolve_model_name,
)
from uue.model.inputs import TowerInput
from uue.model.packing import PackedRunner, PackingOptions, encode_packed, padded_to_flat, ragged_to_flat
from uue.model.packing import resolve_backend as resolve_pack_backend

PoolingKind = Literal["mean", "last_token"]

TINY_HIDDEN = 32
# Wider than BERT's 0.02: a tiny random byte-level model at 0.02 maps every text to nearly the same mean
# vector (cosine > 0.98), which leaves the contrastive loss nothing to learn from in tests.
TINY_INIT_RANGE = 0.5


# The architecture of Qwen/Qwen3-Embedding-0.6B (its config.json): speed measurements need the shape,
# not the weights, and the weights cannot be downloaded on the benchmark machines.
QWEN3_0_6B_SHAPE = dict(
    hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
    intermediate_size=3072, vocab_size=151669, max_position_embeddings=32768, rope_theta=1_000_000.0,
    rms_norm_eps=1e-6, tie_word_embeddings=True,
)


def _tiny_config(kind: str, vocab_size: int) -> PretrainedConfig:
    if kind == "qwen3-0.6b-random":
        shape = dict(QWEN3_0_6B_SHAPE, vocab_size=max(QWEN3_0_6B_SHAPE["vocab_size"], vocab_size))
        return AutoConfig.for_model("qwen3", **shape, pad_token_id=0, eos_token_id=4, bos_token_id=4)
    if kind == "tiny":
        return AutoConfig.for_model(
            "bert", vocab_size=vocab_size, hidden_size=TINY_HIDDEN, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=512, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, initializer_range=TINY_INIT_RANGE,
        )
    return AutoConfig.for_model(
        "qwen3", vocab_size=vocab_size, hidden_size=TINY_HIDDEN, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, intermediate_size=64, max_position_embeddings=512,
        pad_token_id=0, eos_token_id=4, bos_token_id=4, initializer_range=TINY_INIT_RANGE,
    )


def pooling_kind_for(config: PretrainedConfig) -> PoolingKind:
    return "last_token" if is_decoder(config) else "mean"


def _drop_unused_pooler(model: nn.Module) -> None:
    # BERT's pooler (a dense layer on [CLS]) is not used by embedding pooling: unused parameters would
    # get no gradient, which DeepSpeed and DDP treat as an error.
    if getattr(model, "pooler", None) is not None:
        model.pooler = None


def load_backbone(
    name: str, seed: int = 0
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Load (model, tokenizer) for a preset, hub name or local folder.

    `seed` fixes the random initialisation of the tiny presets, so that every worker of a distributed
    run builds identical weights.
    """
    key = name.lower()
    if key in RANDOM_PRESETS:
        tokenizer = build_byte_tokenizer("right" if key == "tiny" else "left")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModel.from_config(_tiny_config(key, len(tokenizer)))
        _drop_unused_pooler(model)
        return model, tokenizer
    path = resolve_model_name(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path)
    except OSError as err:
        hint = ""
        if key == "qwen3-embedding-0.6b" or path == QWEN3_EMBEDDING_HUB_NAME:
            hint = (
                f" Download it where the hub is reachable (huggingface-cli download {QWEN3_EMBEDDING_HUB_NAME})"
                " or point UUE_QWEN3_EMBEDDING_PATH at a local copy."
            )
        raise ModelNotAvailableError(
            f"model {name!r} (resolved to {path!r}) is not available: not a local folder with a config and "
            f"weights, and not in the Hugging Face cache (offline: HF_HUB_OFFLINE="
            f"{os.environ.get('HF_HUB_OFFLINE', 'unset')}).{hint} Presets: {', '.join(PRESETS)}."
        ) from err
    if pooling_kind_for(model.config) == "last_token":
        tokenizer.padding_side = "left"
    _drop_unused_pooler(model)
    return model, tokenizer


def backbone_from_config(config_dict: dict) -> nn.Module:
    """Rebuild a backbone's architecture (random weights) from a saved config dict; weights load after."""
    config_dict = dict(config_dict)
    model_type = config_dict.pop("model_type")
    model = AutoModel.from_config(AutoConfig.for_model(model_type, **config_dict))
    _drop_unused_pooler(model)
    return model


def transformer_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks (BERT: encoder.layer, Qwen/Llama: layers)."""
    for attr in ("encoder.layer", "layers", "transformer.h", "h"):
        node: object = model
        for part in attr.split("."):
            node = getattr(node, part, None)
            if node is None:
                break
        if isinstance(node, nn.ModuleList):
            return node
    raise ValueError(f"cannot find the transformer layers of {type(model).__name__}")


def cut_layer(model: nn.Module, trainable_layers: int) -> int:
    """The block index where training starts when only the top `trainable_layers` blocks train."""
    total = len(transformer_layers(model))
    if not 0 < trainable_layers <= total:
        raise ValueError(f"trainable_layers must be 1..{total} for a {total}-layer backbone, got {trainable_layers}")
    return total - trainable_layers


def freeze_backbone(model: nn.Module, frozen: bool, trainable_layers: int | None) -> None:
    """Freeze the whole backbone, or all but its top `trainable_layers` blocks (and the final norm)."""
    if not frozen and trainable_layers is None:
        return
    for p in model.parameters():
        p.requires_grad_(False)
    if frozen or not trainable_layers:
        return
    layers = transformer_layers(model)
    for layer in list(layers)[-trainable_layers:]:
        for p in layer.parameters():
            p.requires_grad_(True)
    final_norm = getattr(model, "norm", None)  # decoders normalise after the last block
    if isinstance(final_norm, nn.Module):
        for p in final_norm.parameters():
            p.requires_grad_(True)


def pool_hidden_states(hidden: torch.Tensor, attention_mask: torch.Tensor, kind: PoolingKind) -> torch.Tensor:
    """(N, L, H) token states -> (N, H) text vectors."""
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    if kind == "mean":
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    # last token: each row's last real position, left or right padded, found on the device (no host sync:
    # the padded path calls this once per micro-batch).
    length = attention_mask.size(1)
    last = length - 1 - attention_mask.long().flip(1).argmax(1)
    return hidden[torch.arange(hidden.size(0), device=hidden.device), last]


class TextEncoder(nn.Module):
    """A backbone plus its pooling: token ids -> one vector per text.

    `attention="padded"` runs the Hugging Face forward on (N, L) batches (SDPA); "packed" unpads them and
    encodes padding-free packs (uue.model.packing), and `encode_ragged` takes token lists directly.
    """

    def __init__(self, backbone: nn.Module, attention: Literal["padded", "packed"] = "padded",
                 packing: PackingOptions | None = None):
        super().__init__()
        self.backbone = backbone
        self.pooling: PoolingKind = pooling_kind_for(backbone.config)
        self.attention = attention
        self._packed: PackedRunner | None = None
        if attention == "packed":
            self.use_packing(packing or PackingOptions())
        self.compiles_backbone = False
        self.compile_backend = "inductor"
        """torch.compile backend of compile_backbone ("eager": dynamo tracing only, quick CPU checks)."""
        self._compiled_forward: Callable[..., Any] | None = None

    def compile_backbone(self, backend: str | None = None) -> None:
        """Run the padded path's Hugging Face forward under torch.compile (the whole backbone, compiled on first
        use). The compiled function is a cache, not state: copies and pickles recompile, state dicts are unchanged."""
        self.compiles_backbone = True
        self.compile_backend = backend or self.compile_backend
        self._compiled_forward = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_compiled_forward"] = None
        return state

    def _backbone_forward(self) -> Callable[..., Any]:
        if not self.compiles_backbone:
            return self.backbone
        if self._compiled_forward is None:
            self._compiled_forward = torch.compile(self.backbone.forward, backend=self.compile_backend)
        return self._compiled_forward

    def use_packing(self, options: PackingOptions) -> None:
        """Switch to the packed path (registers the "uue_packed" attention with transformers)."""
        self.attention = "packed"
        self._packed = PackedRunner(self.backbone, options, causal=self.pooling == "last_token")

    def use_padded(self) -> None:
        """Back to the padded Hugging Face forward (e.g. an index built padded from a tower saved packed)."""
        self.attention = "padded"
        self._packed = None

    @property
    def hidden_size(self) -> int:
        return int(self.backbone.config.hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self._packed is not None:
            return self._encode_flat(*padded_to_flat(input_ids, attention_mask))
        hidden = self._backbone_forward()(input_ids=input_ids, attention_mask=attention_mask,
                                          use_cache=False).last_hidden_state
        return pool_hidden_states(hidden, attention_mask, self.pooling)

    def encode_ragged(self, sequences: Sequence[Sequence[int] | torch.Tensor]) -> torch.Tensor:
        """Token id lists (no padding, no special tokens added) -> (N, H) vectors, through the packed path."""
        if self._packed is None:
            raise ValueError("encode_ragged needs the packed path (model.attention: packed)")
        device = self.backbone.get_input_embeddings().weight.device
        return self._encode_flat(*ragged_to_flat(sequences, device))

    def _encode_flat(self, lengths: list[int], gather: torch.Tensor, flat_ids: torch.Tensor) -> torch.Tensor:
        runner = self._packed
        assert runner is not None
        weight = self.backbone.get_input_embeddings().weight
        backend = resolve_pack_backend(runner.options.backend, weight.device, weight.dtype,
                                  torch.is_grad_enabled() and weight.requires_grad)
        return encode_packed(runner, self.pooling, lengths, gather, flat_ids, backend)

    def encode(self, inputs: TowerInput) -> torch.Tensor:
        """(N, ...) tower input -> (N, H) pooled vectors: the whole backbone on tokens, its top blocks on hidden
        states cached at a block, nothing on cached vectors."""
        if inputs.vectors is not None:
            return inputs.vectors
        if inputs.hidden is not None:
            return self.forward_from_layer(inputs.hidden, inputs.attention_mask, inputs.layer)
        return self(inputs.input_ids, inputs.attention_mask)

    def forward_from_layer(self, hidden: torch.Tensor, attention_mask: torch.Tensor, layer: int) -> torch.Tensor:
        """Pooled vectors from hidden states cached at block `layer` (uue.model.cache)."""
        dtype = next(self.backbone.parameters()).dtype
        top = forward_from_layer(self.backbone, hidden.to(dtype), attention_mask, layer)
        return pool_hidden_states(top, attention_mask, self.pooling)


# ------------------------------------------------------------------ split at a layer (top-N fine-tuning)
def _embedding_module(model: nn.Module) -> nn.Module:
    """The module whose output is the input of the first block (BERT: embeddings, decoders: embed_tokens)."""
    module = getattr(model, "embeddings", None)
    return module if isinstance(module, nn.Module) else model.get_input_embeddings()


def _layer_slot(model: nn.Module) -> tuple[nn.Module, str]:
    """(parent module, attribute) holding the block ModuleList, so a forward can run a slice of it."""
    layers = transformer_layers(model)
    for parent in model.modules():
        for name, child in parent.named_children():
            if child is layers:
                return parent, name
    raise ValueError(f"cannot find the parent of the transformer layers of {type(model).__name__}")


def _run_blocks(model: nn.Module, blocks: list[nn.Module], input_ids: torch.Tensor, attention_mask: torch.Tensor,
                embedded: torch.Tensor | None) -> torch.Tensor:
    """The backbone's own forward (its masks, positions, final norm) over `blocks` only; with `embedded`,
    the embedding step's output is replaced by it (hidden states cached at a cut)."""
    parent, name = _layer_slot(model)
    full = getattr(parent, name)
    handle = None
    if embedded is not None:
        handle = _embedding_module(model).register_forward_hook(lambda module, args, output: embedded)
    setattr(parent, name, nn.ModuleList(blocks))
    try:
        return model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    finally:
        setattr(parent, name, full)
        if handle is not None:
            handle.remove()


def hidden_states_at(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     layer: int) -> torch.Tensor:
    """(N, L, H) hidden states entering block `layer` (0: the embedding output), running only the blocks below."""
    blocks = list(transformer_layers(model))
    if not 0 <= layer <= len(blocks):
        raise ValueError(f"layer {layer} is outside 0..{len(blocks)}")
    captured: list[torch.Tensor] = []

    def keep(module: nn.Module, args: tuple, output: torch.Tensor | tuple) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output)

    # Read the output of the last block below the cut (or of the embedding step), before any final norm.
    target = blocks[layer - 1] if layer > 0 else _embedding_module(model)
    handle = target.register_forward_hook(keep)
    try:
        _run_blocks(model, blocks[:layer], input_ids, attention_mask, None)
    finally:
        handle.remove()
    return captured[-1]


def forward_from_layer(model: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor,
                       layer: int) -> torch.Tensor:
    """last_hidden_state of the backbone given the hidden states entering block `layer` (see
    `hidden_states_at`): only blocks `layer`.. run, so a frozen bottom is computed once and cached."""
    blocks = list(transformer_layers(model))
    if not 0 <= layer <= len(blocks):
        raise ValueError(f"layer {layer} is outside 0..{len(blocks)}")
    placeholder = torch.zeros(attention_mask.shape, dtype=torch.long, device=attention_mask.device)
    return _run_blocks(model, blocks[layer:], placeholder, attention_mask, hidden)
