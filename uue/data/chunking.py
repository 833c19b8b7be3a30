"""Split over-long history texts into token-bounded chunks before featurization.

`Featurizer.user_features` truncates each chunk to `max_chunk_length` tokens and keeps the
`num_chunks_per_user` most recent chunks. Truncation silently loses the tail of a long post; splitting it
first keeps all of its text as several chunks (same platform and timestamp, original order), and the
featurizer's most-recent selection then decides which pieces fit the per-user budget.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from uue.data.featurize import chunk_text
from uue.data.schema import UserChunk


def chunk_token_budget(tokenizer: PreTrainedTokenizerBase, max_length: int, platform: str | None) -> int:
    """Text tokens one chunk may hold: max_length minus special tokens and the "[platform] " prefix."""
    specials = tokenizer.num_special_tokens_to_add(pair=False)
    prefix = chunk_text(UserChunk(text="", platform=platform)) if platform else ""
    prefix_tokens = len(tokenizer(prefix, add_special_tokens=False)["input_ids"]) if prefix else 0
    budget = max_length - specials - prefix_tokens
    if budget < 1:
        raise ValueError(
            f"max_chunk_length={max_length} leaves no room for text after {specials} special tokens and the "
            f"platform prefix {prefix!r}"
        )
    return budget


def _is_cut_point(starts: list[int], k: int) -> bool:
    """Token k starts a new character (byte-level tokenizers give one character several tokens)."""
    return k == 0 or k >= len(starts) or starts[k] != starts[k - 1]


def split_text(text: str, tokenizer: PreTrainedTokenizerBase, budget: int) -> list[str]:
    """Cut `text` into pieces of at most `budget` tokens each (whitespace at the cuts is dropped).

    Cuts go before a word where one lies in the window's second half (a cut inside a word re-tokenizes
    into different subwords); every piece is re-tokenized and shortened until it fits.
    """
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    starts = [int(start) for start, _ in enc["offset_mapping"]]
    n = len(starts)
    if n <= budget:
        return [text]

    def piece_of(begin: int, end: int) -> str:
        return text[starts[begin] if begin else 0 : starts[end] if end < n else len(text)].strip()

    def fits(piece: str) -> bool:
        return len(tokenizer(piece, add_special_tokens=False)["input_ids"]) <= budget

    pieces, begin = [], 0
    while begin < n:
        end = min(begin + budget, n)
        while begin + 1 < end < n and not _is_cut_point(starts, end):
            end -= 1
        if end < n:
            for k in range(end, begin + max(1, budget // 2), -1):
                if _is_cut_point(starts, k) and starts[k] > 0 and text[starts[k] - 1].isspace():
                    end = k
                    break
        while end - begin > 1 and not fits(piece_of(begin, end)):
            end -= 1
        piece = piece_of(begin, end)
        if piece:
            pieces.append(piece)
        begin = end
    return pieces


def split_long_chunks(
    chunks: Sequence[UserChunk], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> list[UserChunk]:
    """Every chunk whose text (with its platform prefix) exceeds `max_length` tokens becomes several chunks."""
    out: list[UserChunk] = []
    for chunk in chunks:
        budget = chunk_token_budget(tokenizer, max_length, chunk.platform)
        for piece in split_text(chunk.text, tokenizer, budget):
            out.append(UserChunk(text=piece, platform=chunk.platform, timestamp=chunk.timestamp))
    return out
