from __future__ import annotations

import numpy as np
import pytest

from features.content import (
    CachedTextEncoder,
    ContentEncoder,
    HashingTextEncoder,
    TagEncoder,
    TextEncoder,
)


class CountingEncoder:
    def __init__(self) -> None:
        self.dim = 8
        self.calls: list[list[str]] = []
        self.inner = HashingTextEncoder(8)

    def encode(self, texts):
        self.calls.append(list(texts))
        return self.inner.encode(texts)


def test_hashing_encoder_is_deterministic_and_normalised():
    a = HashingTextEncoder(32).encode(["Star Wars", "Heat"])
    b = HashingTextEncoder(32).encode(["Star Wars", "Heat"])
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-5)
    assert isinstance(HashingTextEncoder(), TextEncoder)


def test_cache_batches_misses_once_and_evicts_lru():
    inner = CountingEncoder()
    enc = CachedTextEncoder(inner, capacity=2)
    first = enc.encode(["a", "b", "a"])
    assert inner.calls == [["a", "b"]]
    np.testing.assert_array_equal(first[0], first[2])
    enc.encode(["a", "b"])
    assert len(inner.calls) == 1  # all hits
    enc.encode(["c"])  # evicts the least recently used: "a"
    enc.encode(["b", "a"])
    assert inner.calls[-1] == ["a"]
    assert len(enc) == 2


def test_tags_similar_bags_are_close_and_tokens_follow_contract():
    enc = TagEncoder(dim=64)
    v = enc.encode([["Action", "Thriller"], ["Action"], ["Romance"]])
    assert v[0] @ v[1] > v[0] @ v[2]
    toks = enc.tokens([["Action", "Thriller"], ["Action"]], max_tags=3)
    assert toks.dtype == np.int64 and toks[0, 0] == toks[1, 0] > 0
    assert toks[1, 1] == 0 and toks[0, 2] == 0


def test_content_encoder_fuses_blocks_and_checks_vector_shapes():
    enc = ContentEncoder(HashingTextEncoder(16), tag_dim=8, vector_dims={"img": 4})
    batch = enc.encode(
        [
            {
                "item_id": 1,
                "text": "Toy Story",
                "tags": ["Animation"],
                "vectors": {"img": [1, 0, 0, 0]},
            },
            {"item_id": 2},  # no content at all: zero blocks, still a row
        ]
    )
    fused = batch.fused()
    assert fused.shape == (2, enc.dim) == (2, 28)
    assert np.isclose(np.linalg.norm(fused[0]), 1.0) and not fused[1].any()
    with pytest.raises(ValueError, match=r"vectors\['img'\].*expected \(4,\)"):
        enc.encode([{"item_id": 3, "vectors": {"img": [1.0, 2.0]}}])


def test_real_sentence_model_embeds_titles(sentence_encoder):
    enc = ContentEncoder(sentence_encoder, tag_dim=16)
    batch = enc.encode(
        [
            {"item_id": 1, "text": "Toy Story"},
            {"item_id": 2, "text": "Toy Story 2"},
            {"item_id": 3, "text": "Schindler's List"},
        ]
    )
    t = batch.text
    assert t.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1.0, rtol=1e-4)
    assert t[0] @ t[1] > t[0] @ t[2]
    # The cache answers a repeat without the model and gives the same vector.
    again = enc.encode([{"item_id": 1, "text": "Toy Story"}]).text
    np.testing.assert_allclose(again[0], t[0])
    assert enc.text_encoder.hits >= 1
