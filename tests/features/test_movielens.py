from __future__ import annotations

import csv

import numpy as np
import pytest

from features.movielens import GROUPLENS_GENRES, click_events, find_movielens, load_movielens


def _ratings_in_file(path):
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh, delimiter="\t"))[1:]
    return [int(float(r[2])) for r in rows]


def test_labelled_counts_match_the_file(ml, data_dir):
    ratings = _ratings_in_file(data_dir / "ml-100k" / "ml-100k.inter")
    assert ml.ratings == len(ratings) == 100_000
    assert len(ml) == sum(r != 3 for r in ratings) == 72_855
    assert int(ml.clicks["label"].sum()) == sum(r >= 4 for r in ratings) == 55_375
    assert int((ml.clicks["label"] == 0).sum()) == sum(r <= 2 for r in ratings)
    assert (ml.clicks["label"] == (ml.clicks["rating"] >= 4)).all()
    assert len(ml.items) == 1682 and len(ml.users) == 943
    assert len(set(ml.clicks["event_id"])) == len(ml)


def test_time_order_with_file_order_tie_break(ml, data_dir):
    ts = ml.clicks["ts"]
    assert (np.diff(ts) >= 0).all()
    with open(data_dir / "ml-100k" / "ml-100k.inter") as fh:
        lines = [ln.split("\t") for ln in fh.read().splitlines()[1:]]
    line_of = {f"{u}:{i}": k for k, (u, i, r, _) in enumerate(lines) if int(float(r)) != 3}
    pos = np.array([line_of[e] for e in ml.clicks["event_id"]])
    same = np.diff(ts) == 0
    assert same.any() and (np.diff(pos)[same] > 0).all()


def test_attributes_and_events(ml):
    assert ml.items["1"] == {
        "title": "Toy Story",
        "year": 1995,
        "genres": ["Animation", "Children's", "Comedy"],
    }
    assert ml.users["1"] == {
        "age": 24,
        "gender": "M",
        "occupation": "technician",
        "zip_code": "85711",
    }
    ev = click_events(ml, 0, 2)
    assert set(ev[0]) == {"event_id", "ts", "user_id", "item_id", "label", "user"}
    assert ev[0]["user"] == ml.users[ev[0]["user_id"]]


def _write_grouplens(src, dst, n_ratings):
    """A GroupLens-layout copy of the first ``n_ratings`` ratings and all items/users."""
    dst.mkdir()
    inter = (src / "ml-100k.inter").read_text().splitlines()[1 : 1 + n_ratings]
    (dst / "u.data").write_text("".join(f"{ln}\n" for ln in inter))
    (dst / "u.genre").write_text("".join(f"{g}|{k}\n" for k, g in enumerate(GROUPLENS_GENRES)))
    lines = []
    for ln in (src / "ml-100k.item").read_text().splitlines()[1:]:
        iid, title, year, genres = (ln.split("\t") + [""] * 3)[:4]
        flags = ["1" if g in genres.split() else "0" for g in GROUPLENS_GENRES]
        lines.append("|".join([iid, f"{title} ({year})", f"01-Jan-{year}", "", "http://x", *flags]))
    (dst / "u.item").write_text("\n".join(lines) + "\n", encoding="latin-1")
    users = [ln.replace("\t", "|") for ln in (src / "ml-100k.user").read_text().splitlines()[1:]]
    (dst / "u.user").write_text("\n".join(users) + "\n")


def test_grouplens_layout_loads_the_same_events(tmp_path, data_dir):
    src = data_dir / "ml-100k"
    _write_grouplens(src, tmp_path / "gl", 3000)
    rec = tmp_path / "rb"
    rec.mkdir()
    for name in ("ml-100k.item", "ml-100k.user"):
        (rec / name).write_text((src / name).read_text())
    (rec / "ml-100k.inter").write_text(
        "\n".join((src / "ml-100k.inter").read_text().splitlines()[:3001]) + "\n"
    )
    gl, rb = load_movielens(tmp_path / "gl"), load_movielens(rec)
    assert (gl.layout, rb.layout) == ("grouplens", "recbole")
    for k in rb.clicks:
        np.testing.assert_array_equal(gl.clicks[k], rb.clicks[k], err_msg=k)
    assert gl.users == rb.users
    strip = lambda items: {i: (a["year"], a["genres"]) for i, a in items.items()}  # noqa: E731
    assert strip(gl.items) == strip(rb.items)
    assert gl.items["1"]["title"] == "Toy Story"  # GroupLens "(1995)" suffix removed
    assert find_movielens(tmp_path / "gl") == (tmp_path / "gl", "grouplens")


def test_missing_dataset_error_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="HEADWATER_DATA_DIR"):
        find_movielens(tmp_path)
