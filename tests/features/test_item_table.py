"""The item table serving's per-item caches share (features/item_table.py)."""

from __future__ import annotations

from features.item_table import ItemTable


def test_numbers_grow_past_the_first_block_and_stale_rows_follow_the_objects():
    t = ItemTable(objects=2, limit=10_000)
    attrs = [{"year": k} for k in range(3000)]
    codes = [None] * 3000  # items sharing one object (as items without codes do)
    items = [f"m{k}" for k in range(3000)]
    rows, stale = t.rows(items, attrs, codes)
    assert rows.tolist() == list(range(3000)) and len(stale) == 3000
    assert t.capacity >= 3000
    for k in range(0, 3000, 2):
        t.keep(k, (attrs[k], codes[k]))
    _, stale = t.rows(items, attrs, codes)
    assert stale.tolist() == list(range(1, 3000, 2))  # the rows not kept yet
    codes2 = list(codes)
    codes2[4] = {"codes": [1]}  # one item's codes re-read: only its row is stale
    assert t.rows(items[:6:2], attrs[:6:2], codes2[:6:2])[1].tolist() == [2]


def test_more_items_than_the_limit_start_numbering_again():
    t = ItemTable(objects=1, limit=100)
    a = [{}] * 80
    t.rows([f"a{k}" for k in range(80)], a)
    for k in range(80):
        t.keep(k, (a[k],))
    rows, stale = t.rows([f"b{k}" for k in range(30)], [{}] * 30)  # 110 > 100
    assert len(t) == 30 and rows.tolist() == list(range(30)) and len(stale) == 30
    assert t.rows(["a0"], [a[0]])[1].tolist() == [0]  # forgotten: its row is rebuilt


def test_without_a_limit_only_the_caller_clears():
    t = ItemTable(objects=1, limit=None)
    t.rows([f"a{k}" for k in range(3000)], [None] * 3000)
    t.rows([f"b{k}" for k in range(3000)], [None] * 3000)
    assert len(t) == 6000
    t.clear()
    assert len(t) == 0 and t.rows(["b0"], [None])[0].tolist() == [0]
