"""Stored users with the real (tiny) user tower: appends equal a full recomputation and encode only the new
chunks, eviction is training's, other models' states are refused, explanations are leave-one-out and find
a planted chunk."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from uue.data.schema import Statement, UserChunk, UserData
from uue.model import UUEModel
from uue.serving.api import RequestError
from uue.serving.local import InProcessBackend
from uue.serving.user_store import open_user_store
from uue.serving.users import UserService

LIMIT = 8


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    from uue.config import ModelConfig

    config = ModelConfig(
        user_model_name="tiny", item_model_name="tiny", embedding_dim=16, attention_heads=4, max_chunk_length=32,
        max_statement_length=16, max_context_length=8, num_chunks_per_user=LIMIT, dropout=0.0,
        num_negative_samples=0, negative_sampling="none",
    )
    folder = tmp_path_factory.mktemp("users") / "model"
    UUEModel.from_config(config, seed=3).save_pretrained(folder)
    return CountingBackend(folder)


class CountingBackend(InProcessBackend):
    """The in-process towers, counting the chunks the user tower encodes."""

    def __init__(self, folder):
        super().__init__(folder, device="cpu")
        self.chunks_encoded = 0

    async def encode_and_pool(self, chunks, stored, kept_new, metadata):
        self.chunks_encoded += len(chunks)
        return await super().encode_and_pool(chunks, stored, kept_new, metadata)


@pytest.fixture(params=["sqlite", "redis"])
def service(request, backend, tmp_path):
    if request.param == "sqlite":
        store = open_user_store("sqlite", path=str(tmp_path / "users.sqlite"))
    else:
        store = open_user_store("redis", url=request.getfixturevalue("redis_url"), prefix=f"svc:{tmp_path.name}:")
    yield UserService(store, backend, model_fingerprint="fp-a", num_chunks_per_user=LIMIT)
    store.close()


def _history(n: int) -> list[UserChunk]:
    topics = ["hiking", "pasta", "horror films", "jazz", "chess", "sailing", "poetry", "coffee"]
    return [UserChunk(f"message {i}: a note about {topics[i % len(topics)]} and {topics[(3 * i) % 8]}",
                      "forum" if i % 3 else None, f"2025-05-{1 + (i * 7) % 28:02d}T12:00:00Z" if i % 5 else None)
            for i in range(n)]


def test_append_equals_full_recomputation_and_encodes_only_new_chunks(service, backend):
    history = _history(13)
    asyncio.run(service.put("u1", UserData("u1", history[:5])))
    for start, stop in ((5, 6), (6, 9), (9, 10), (10, 13)):
        before = backend.chunks_encoded
        state = asyncio.run(service.append("u1", history[start:stop]))
        assert backend.chunks_encoded - before == stop - start  # the new chunks, not the history
        full = backend.users.encode([UserData("u1", history[:stop])])[0]  # select_chunks inside
        np.testing.assert_allclose(state.vector, full, atol=1e-5)
    stored = asyncio.run(service.get("u1"))
    assert len(stored.chunks) == LIMIT and stored.next_seq == 13  # 13 chunks, the 8 most recent kept
    np.testing.assert_allclose(stored.vector, backend.users.encode([UserData("u1", history)])[0], atol=1e-5)
    assert all(c.text is None and len(c.text_hash) == 32 for c in stored.chunks)  # no text unless configured
    # PUT replaces the whole history.
    replaced = asyncio.run(service.put("u1", UserData("u1", history[:2], metadata={"k": 1})))
    assert [c.seq for c in replaced.chunks] == [13, 14] and replaced.metadata == {"k": 1}
    np.testing.assert_allclose(replaced.vector, backend.users.encode([UserData("u1", history[:2])])[0], atol=1e-5)


def test_concurrent_appends_keep_every_chunk_and_a_consistent_vector(service, backend):
    history = _history(LIMIT)

    async def main():
        await asyncio.gather(*(service.append("u2", [chunk]) for chunk in history))
        return await service.get("u2")

    state = asyncio.run(main())
    assert state.version == LIMIT and sorted(c.timestamp or "" for c in state.chunks) == \
        sorted(c.timestamp or "" for c in history)
    order = [c.seq for c in state.chunks]  # arrival order decided by the store's commits
    by_hash = {c.text_hash: c for c in state.chunks}
    from uue.serving.user_store import text_hash

    arrived = sorted(history, key=lambda c: by_hash[text_hash(c.text)].seq)
    assert order == sorted(order)
    np.testing.assert_allclose(state.vector, backend.users.encode([UserData("u2", arrived)])[0], atol=1e-5)


def test_other_models_states_are_refused_and_put_replaces_them(service, backend):
    asyncio.run(service.put("u3", UserData("u3", _history(3))))
    newer = UserService(service.store, backend, model_fingerprint="fp-b", num_chunks_per_user=LIMIT)
    for call in (newer.get("u3"), newer.append("u3", _history(1))):
        with pytest.raises(RequestError, match="PUT the user's history again") as err:
            asyncio.run(call)
        assert err.value.status == 409
    assert len(asyncio.run(service.get("u3")).chunks) == 3  # the refused append changed nothing
    assert asyncio.run(newer.put("u3", UserData("u3", _history(2)))).model_fingerprint == "fp-b"
    with pytest.raises(RequestError) as err:
        asyncio.run(service.get("u3"))
    assert err.value.status == 409
    assert asyncio.run(newer.delete("u3")) is True
    with pytest.raises(RequestError) as err:
        asyncio.run(newer.get("u3"))
    assert err.value.status == 404


def test_a_retried_append_with_its_idempotency_key_appends_once(service, backend):
    """The key is stored with the chunks in one write: a retry of a request that landed writes nothing and
    says so (`replayed`), encodes nothing; the key with another body is refused; keys survive a PUT and are
    kept for the last REQUEST_KEYS_KEPT keyed appends."""
    from uue.serving.user_store import REQUEST_KEYS_KEPT

    history = _history(4)
    first = asyncio.run(service.append("u5", history[:1], request_key="req-1"))
    before = backend.chunks_encoded
    again = asyncio.run(service.append("u5", history[:1], request_key="req-1"))
    assert again.replayed and not first.replayed and backend.chunks_encoded == before
    assert again.version == first.version == 1 and len(again.chunks) == 1
    with pytest.raises(RequestError, match="Idempotency-Key 'req-1' was used for another request") as err:
        asyncio.run(service.append("u5", history[1:2], request_key="req-1"))
    assert err.value.status == 422 and err.value.param == "Idempotency-Key"
    assert asyncio.run(service.append("u5", history[1:2], request_key="req-2")).version == 2
    assert asyncio.run(service.append("u5", history[1:2])).version == 3  # no key: appended again, by design
    asyncio.run(service.put("u5", UserData("u5", history[2:3])))
    assert asyncio.run(service.append("u5", history[:1], request_key="req-1")).replayed  # kept across a PUT
    for i in range(REQUEST_KEYS_KEPT):
        asyncio.run(service.append("u5", history[3:], request_key=f"later-{i}"))
    assert not asyncio.run(service.append("u5", history[:1], request_key="req-1")).replayed  # forgotten by now
    assert len(asyncio.run(service.get("u5")).request_keys) == REQUEST_KEYS_KEPT


def test_concurrent_retries_of_one_keyed_append_write_it_once(service):
    """Two attempts of one request in flight at once (a client retrying before the first answered): the
    compare-and-set loop re-reads after losing, finds the key and writes nothing."""
    chunk = _history(1)

    async def main():
        return await asyncio.gather(*(service.append("u6", chunk, request_key="same") for _ in range(4)))

    answers = asyncio.run(main())
    assert sorted(a.replayed for a in answers) == [False, True, True, True]
    assert len(asyncio.run(service.get("u6")).chunks) == 1


STATEMENTS = ["loves hiking in the mountains", "enjoys cooking at home", "would enjoy a horror film",
              "plays jazz piano", "likes cats"]


@pytest.fixture
def sqlite_service(backend, tmp_path):
    store = open_user_store("sqlite", path=str(tmp_path / "users.sqlite"))
    yield UserService(store, backend, model_fingerprint="fp-a", num_chunks_per_user=LIMIT)
    store.close()


def test_explanation_ranks_a_planted_chunk_first_and_is_leave_one_out(sqlite_service, backend):
    """For each statement, plant the candidate text that scores highest on its own among filler that scores
    lowest: the explanation ranks it first, and every contribution is the score minus the score of the user
    encoded without that chunk (the plain tower path)."""
    words = "hiking cooking horror jazz piano chess running knitting gardening sailing poetry coffee".split()
    candidates = [f"I spent the weekend {w} with {who}" for w in words for who in ("friends", "my sister")]
    # The platform is part of what the tower reads ("[blog] ..."): score each candidate as it will be sent.
    as_blog = backend.users.encode([UserData("", [UserChunk(text, "blog")]) for text in candidates])
    as_forum = backend.users.encode([UserData("", [UserChunk(text, "forum")]) for text in candidates])
    statement_vectors, _ = backend.statements.encode([Statement("", s) for s in STATEMENTS])
    for statement, vector in zip(STATEMENTS, statement_vectors, strict=True):
        best = int(np.argmax(as_blog @ vector))
        lowest = [i for i in np.argsort(as_forum @ vector) if i != best][:6]
        filler = [UserChunk(candidates[i], "forum", f"2025-01-0{n + 1}T00:00:00Z") for n, i in enumerate(lowest)]
        planted = UserChunk(candidates[best], "blog", "2025-02-01T00:00:00Z")
        chunks = filler[:3] + [planted] + filler[3:]
        service = sqlite_service
        asyncio.run(service.put("u4", UserData("u4", chunks)))
        stored, inline = asyncio.run(service.stored("u4")), asyncio.run(service.inline(UserData("", chunks)))
        score = float(backend.users.encode([UserData("", chunks)])[0] @ vector)
        without = backend.users.encode([UserData("", chunks[:i] + chunks[i + 1 :]) for i in range(len(chunks))])
        for user in (stored, inline):
            (explained,) = asyncio.run(service.explain(user, vector[None, :], top=7))
            assert explained[0].index == 3 and explained[0].platform == "blog", (statement, explained)
            assert explained[0].timestamp == "2025-02-01T00:00:00Z"
            np.testing.assert_allclose([item.contribution for item in explained],
                                       [score - without[item.index] @ vector for item in explained], atol=1e-5)
            contributions = [item.contribution for item in explained]
            assert contributions == sorted(contributions, reverse=True) and len(explained) == 7
        # A stored user's chunks also carry their arrival number; an inline user's have none.
        assert explained[0].seq is None
        assert asyncio.run(service.explain(stored, vector[None], 1))[0][0].seq == stored.chunks[3].seq
