"""The frozen-prefix cache: what a frozen part of a backbone makes of each distinct text, computed once.

A frozen backbone maps a token sequence to the same output at every step, so encoding it once and training
only what sits above gives the same model as re-encoding every step, at a fraction of the cost (on a 2-core
CPU the backbone is most of the work). The frozen part is a prefix of the backbone: all of it (`layer` = its
depth), whose output is a text's pooled vector (`cache_chunk_vectors`, `cache_statement_vectors`, and
evaluation of frozen-backbone models and the untrained baseline), or the blocks below `layer`, whose output is
the text's hidden states entering that block (`cache_hidden_states`: top-N training), real tokens only.

Entries are keyed by a digest of a sequence's tokens, in a table keyed by the backbone's fingerprint (its
weights, pooling and tokenizer) and the layer: caches of one backbone and layer in a process share one table
(evaluation's model and baseline, every split, a training run before them), and with a cache folder
(`model.caching.cache_dir`, or the UUE_CHUNK_CACHE_DIR environment variable, which overrides it) the vectors
are also kept on disk, so runs that share a frozen backbone (option comparisons, seeds, a later
`uue evaluate`) encode each text once between them. Hidden states stay in memory: they are hundreds of times
larger.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from uue.data.featurize import pad_sequences
from uue.model.backbone import TextEncoder, hidden_states_at, transformer_layers

CACHE_DIR_ENV = "UUE_CHUNK_CACHE_DIR"


def resolve_cache_dir(configured: str | None) -> str | None:
    """The cache folder: UUE_CHUNK_CACHE_DIR when set, else the configured one (model.caching.cache_dir)."""
    return os.environ.get(CACHE_DIR_ENV) or configured or None


def backbone_fingerprint(encoder: TextEncoder, tokenizer: PreTrainedTokenizerBase) -> str:
    """Hash of the weights and of what decides a text's tokens and vector (tokenizer, pooling)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{encoder.pooling}|{type(tokenizer).__name__}|{len(tokenizer)}|".encode())
    for name, tensor in sorted(encoder.backbone.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def sequence_key(tokens: Sequence[int]) -> bytes:
    return hashlib.blake2b(np.asarray(tokens, dtype=np.int64).tobytes(), digest_size=16).digest()


class _Table:
    """Digest of a sequence's tokens -> its cached output; the file on disk (if any) and how much of it is saved.

    One per (fingerprint, layer) in a process while some cache uses it (a weak registry: nothing outlives its
    users), so caches of one backbone share what any of them encoded and none rewrites what another saved.
    """

    _open: ClassVar[weakref.WeakValueDictionary[tuple[str, int], _Table]] = weakref.WeakValueDictionary()

    def __init__(self, path: Path | None):
        self.path = path
        self.entries: dict[bytes, np.ndarray] = {}
        if path is not None and path.is_file():
            with path.open("rb") as f:
                self.entries = pickle.load(f)  # a file this process family wrote (local cache, not shared input)
        self.saved_size = len(self.entries)

    @classmethod
    def shared(cls, fingerprint: str, layer: int, path: Path | None) -> _Table:
        key = (fingerprint, layer)
        table = cls._open.get(key)
        if table is None:
            table = cls._open[key] = cls(path)
        return table

    def save(self) -> None:
        """Write the table if it grew since anyone's last write; atomic (a reader sees the old or the new file)."""
        if self.path is None or len(self.entries) <= self.saved_size:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(f".tmp{os.getpid()}")
        with partial.open("wb") as f:
            pickle.dump(self.entries, f, protocol=pickle.HIGHEST_PROTOCOL)
        partial.replace(self.path)
        self.saved_size = len(self.entries)


class FrozenPrefixCache:
    """Token sequences -> what the frozen prefix of `encoder`'s backbone up to block `layer` makes of each:
    its pooled (H,) vector when `layer` is None or the backbone's depth, its (tokens, H) hidden states entering
    block `layer` otherwise, each distinct sequence computed once.

    `shared`: compute the backbone's fingerprint and share the process's table of it (evaluation always does);
    with a `cache_dir` the table is shared and kept on disk too. Otherwise the cache has a table of its own (a
    large backbone's fingerprint costs seconds per worker).
    """

    def __init__(self, encoder: TextEncoder, tokenizer: PreTrainedTokenizerBase, layer: int | None = None, *,
                 device: str | torch.device = "cpu", micro_batch: int = 32, hidden_dtype: torch.dtype = torch.float16,
                 cache_dir: str | None = None, shared: bool = False):
        self.encoder = encoder
        self.depth = len(transformer_layers(encoder.backbone))
        self.layer = self.depth if layer is None else layer
        self.device = torch.device(device)
        self.micro_batch = micro_batch
        self.hidden_dtype = hidden_dtype
        self.pad_id = tokenizer.pad_token_id or 0
        self.left = tokenizer.padding_side == "left"
        self.fingerprint = backbone_fingerprint(encoder, tokenizer) if shared or cache_dir else None
        path = None
        if cache_dir and self.keeps_vectors and self.fingerprint:
            path = Path(cache_dir) / f"frozen-prefix-{self.fingerprint}-layer{self.layer}.pkl"
        self._table = _Table.shared(self.fingerprint, self.layer, path) if self.fingerprint else _Table(None)
        self.users: dict[str, list[np.ndarray]] = {}
        """user_id -> its chunks' entries, in order (`user_chunks`: later epochs hash no tokens again)."""
        self.encoded = 0
        """Sequences this cache ran through the backbone (the rest were shared or read from disk)."""
        self.progress: str | None = None
        """A progress bar's label while encoding (evaluation sets it); None: no bar (the training loop)."""

    @property
    def keeps_vectors(self) -> bool:
        """Whether entries are pooled vectors (the whole backbone is the prefix), not hidden states."""
        return self.layer == self.depth

    @property
    def entries(self) -> dict[bytes, np.ndarray]:
        return self._table.entries

    def _encode(self, ids: torch.Tensor, mask: torch.Tensor) -> list[np.ndarray]:
        """One micro-batch of padded sequences -> each one's entry."""
        if self.keeps_vectors:
            return list(self.encoder(ids, mask).float().cpu().numpy())
        states = hidden_states_at(self.encoder.backbone, ids, mask, self.layer).to(self.hidden_dtype).cpu()
        return [row[used].numpy() for row, used in zip(states, mask.bool().cpu(), strict=True)]

    @torch.no_grad()
    def lookup(self, sequences: Sequence[Sequence[int]], by_length: bool = True,
               micro_batch: int | None = None) -> list[np.ndarray]:
        """Each sequence's entry, encoding those the table lacks `micro_batch` at a time, longest first
        (`by_length`: similar lengths share a micro-batch) or in the order given."""
        keys = [sequence_key(tokens) for tokens in sequences]
        missing: dict[bytes, Sequence[int]] = {}
        for key, tokens in zip(keys, sequences, strict=True):
            if key not in self.entries and key not in missing:
                missing[key] = tokens
        if missing:
            order = sorted(missing, key=lambda k: -len(missing[k])) if by_length else list(missing)
            self._encode_missing([(key, missing[key]) for key in order], micro_batch or self.micro_batch)
        return [self.entries[key] for key in keys]

    def _encode_missing(self, todo: list[tuple[bytes, Sequence[int]]], micro_batch: int) -> None:
        was_training = self.encoder.training
        self.encoder.eval()  # a frozen prefix runs as at inference (no dropout), once
        total = sum(len(tokens) for _, tokens in todo)
        with tqdm(total=total, desc=self.progress, unit="tok", unit_scale=True, disable=self.progress is None) as bar:
            for start in range(0, len(todo), micro_batch):
                part = todo[start : start + micro_batch]
                ids, mask = pad_sequences([tokens for _, tokens in part], self.pad_id, self.left)
                outputs = self._encode(torch.as_tensor(ids, device=self.device),
                                       torch.as_tensor(mask, device=self.device))
                self.entries.update(zip([key for key, _ in part], outputs, strict=True))
                bar.update(int(mask.sum()))
        self.encoder.train(was_training)
        self.encoded += len(todo)

    def user_chunks(self, rows: Sequence[dict[str, Any]]) -> list[list[np.ndarray]]:
        """Preprocessed user rows ({user_id, chunk_tokens}) -> each user's chunk entries, in order; a user's chunks
        are looked up once, the first time the user comes by (the training loop's collator, evaluation)."""
        new = {row["user_id"]: row["chunk_tokens"] for row in rows if row["user_id"] not in self.users}
        encoded_before = self.encoded
        if new:
            entries = iter(self.lookup([tokens for user in new.values() for tokens in user]))
            for user_id, user in new.items():
                self.users[user_id] = [next(entries) for _ in user]
        self._save_now_and_then(grew=self.encoded > encoded_before)
        return [self.users[row["user_id"]] for row in rows]

    def _save_now_and_then(self, grew: bool) -> None:
        """The training loop's writes: when the table grew by a quarter (at least 64 entries) since the last
        write, and on the first lookup that encodes nothing (at the latest the second epoch)."""
        pending = len(self.entries) - self._table.saved_size
        if pending and (not grew or pending >= max(64, self._table.saved_size // 4)):
            self.save()

    def save(self) -> None:
        """Write the table to the cache folder now, if it grew since anyone's last write (no-op without one)."""
        self._table.save()
