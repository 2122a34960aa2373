from __future__ import annotations

import hashlib

import pytest

from features.schema import FeatureSchema


def test_canonical_json_and_hash():
    s = FeatureSchema(["user_id", "item_id"], ["ctr"], version=2)
    assert s.to_json() == '{"categorical":["user_id","item_id"],"dense":["ctr"],"version":2}'
    assert s.hash == hashlib.sha256(s.to_json().encode()).hexdigest()
    assert FeatureSchema.from_json(s.to_json()) == s
    assert s.columns == ["c:user_id", "c:item_id", "d:ctr"]


def test_order_matters_for_the_hash():
    assert FeatureSchema(["a", "b"]).hash != FeatureSchema(["b", "a"]).hash


def test_invalid_schemas_are_rejected():
    with pytest.raises(ValueError, match="duplicate"):
        FeatureSchema(["a", "a"])
    with pytest.raises(ValueError, match="version"):
        FeatureSchema(["a"], version=0)
    with pytest.raises(ValueError, match="categorical"):
        FeatureSchema.from_json('{"dense": []}')
