"""Feature definitions: the shipped MovieLens one, and clear errors for bad files."""

from __future__ import annotations

import pytest

from features.counters import CounterConfig
from features.definition import DefinitionError, load, parse
from features.rows import RowBuilder, RowConfig


def test_the_movielens_definition_is_the_previous_built_in_configuration():
    d = load()
    default = CounterConfig()
    assert [(s.name, s.key) for s in d.counters.specs] == [(s.name, s.key) for s in default.specs]
    assert (d.counters.half_lives, d.counters.alpha, d.counters.prior) == (
        default.half_lives, default.alpha, default.prior)
    built = RowBuilder(d.row_config())
    before = RowBuilder(RowConfig())
    assert built.schema.categorical == before.schema.categorical
    assert built.schema.dense == before.schema.dense
    assert built.schema.definition == f"movielens:{d.digest[:16]}"
    assert built.schema.hash != before.schema.hash  # rows of a definition say which one


def test_the_digest_follows_the_content_not_the_layout():
    a = parse("name: x\ncounters: {families: {user: [user_id]}, half_lives: [1h]}")
    b = parse("name: x\ncounters:\n  half_lives: [3600]\n  families:\n    user: [user_id]\n")
    c = parse("name: x\ncounters: {families: {user: [user_id]}, half_lives: [2h]}")
    assert a.counters == b.counters and c.digest != a.digest


@pytest.mark.parametrize(("text", "words"), [
    ("name: x\ncounters: [", "not valid YAML"),
    ("name: x\n", "missing required field `counters`"),
    ("name: x\ncounters: {families: {}}\ncolour: red", "unknown field `colour`"),
    ("name: x\ncounters: {families: {user: user_id}}", "counters.families.user: expected a list of key fields"),
    ("name: x\ncounters: {families: {user: [user_id]}, half_lives: [0s]}", "a duration must be > 0"),
    ("name: x\ncounters: {families: {user: [user_id]}, half_lives: [fortnight]}", "'fortnight' is not a duration"),
    ("name: x\ncounters: {families: {user: [usr]}}", "counters.families.user: CounterSpec 'user': unknown key field 'usr'"),
    ("name: x\ncounters: {families: {user: [user_id]}, smoothing: {prior: 2}}", "0 <= prior <= 1"),
    ("name: x\ncounters: {families: {user: [user_id]}}\nmodel: {bucketized: [item]}", "model.bucketized names unknown counters ['item']"),
    ("name: x\ncounters: {families: {u: [user_id]}}\nattributes: {user: [age], item: [age]}", "must be unique"),
])
def test_bad_definitions_name_the_file_and_the_field(text, words):
    with pytest.raises(DefinitionError) as err:
        parse(text, "bad.yaml")
    assert str(err.value).startswith("bad.yaml: ") and words in str(err.value), str(err.value)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(DefinitionError, match="nope.yaml"):
        load(tmp_path / "nope.yaml")
