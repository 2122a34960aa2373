"""MovieLens-100K as Headwater events: items, users and labelled click events.

Reads either layout of the same data:

- RecBole atomic files (``ml-100k.inter``, ``ml-100k.item``, ``ml-100k.user``: tab
  separated with typed headers; genres space separated), as shipped in the RecBole wheel;
- GroupLens' original files (``u.data`` tab separated, ``u.item`` and ``u.user`` pipe
  separated latin-1, genres as 19 flag columns named by ``u.genre``).

Labels follow docs/protocol.md (RecBole's context-aware protocol): rating >= 4 is a click
(1), rating <= 2 is shown-not-clicked (0), rating 3 is dropped. Events are in timestamp
order; ties keep file order (a stable sort), so every run replays the same sequence.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["GROUPLENS_GENRES", "MovieLens", "click_events", "find_movielens", "load_movielens"]

GROUPLENS_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip


@dataclass
class MovieLens:
    """The loaded dataset.

    ``clicks`` columns (time order): ``event_id`` (``"<user>:<item>"``, unique because a
    user rates an item once), ``ts`` float64, ``user_id``/``item_id`` str, ``label`` int8,
    ``rating`` int8. ``items``: id → ``title``, ``year`` (int or None), ``genres`` (list).
    ``users``: id → ``age`` (int), ``gender``, ``occupation``, ``zip_code``.
    """

    clicks: dict[str, np.ndarray]
    items: dict[str, dict[str, Any]]
    users: dict[str, dict[str, Any]]
    layout: str
    ratings: int

    def __len__(self) -> int:
        return len(self.clicks["ts"])


def find_movielens(path: str | os.PathLike | None = None) -> tuple[Path, str]:
    """Locate the ml-100k directory and its layout (``"recbole"`` or ``"grouplens"``).

    ``path`` may be the directory itself or a datasets root holding ``ml-100k/``; the
    default is ``$HEADWATER_DATA_DIR`` or ``<repo>/../shared/datasets``.
    """
    if path is None:
        env = os.environ.get("HEADWATER_DATA_DIR")
        path = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "datasets"
    base = Path(path)
    for d in (base, base / "ml-100k"):
        if (d / "ml-100k.inter").is_file():
            return d, "recbole"
        if (d / "u.data").is_file():
            return d, "grouplens"
    raise FileNotFoundError(
        f"no MovieLens-100K at {base}: expected ml-100k.inter (RecBole) or u.data (GroupLens) "
        "there or in its ml-100k/ folder; set HEADWATER_DATA_DIR or pass --path"
    )


def _year(text: str) -> int | None:
    digits = text.strip()[-4:]
    return int(digits) if digits.isdigit() else None


def _read_recbole(d: Path) -> tuple[np.ndarray, dict, dict]:
    inter = np.loadtxt(d / "ml-100k.inter", delimiter="\t", skiprows=1, dtype=np.int64, ndmin=2)
    items: dict[str, dict[str, Any]] = {}
    with open(d / "ml-100k.item", encoding="utf-8") as fh:
        next(fh)
        for line in fh:
            iid, title, year, genres = (line.rstrip("\n").split("\t") + ["", "", ""])[:4]
            items[iid] = {"title": title, "year": _year(year), "genres": genres.split()}
    users: dict[str, dict[str, Any]] = {}
    with open(d / "ml-100k.user", encoding="utf-8") as fh:
        next(fh)
        for line in fh:
            uid, age, gender, occ, zipc = line.rstrip("\n").split("\t")
            users[uid] = {"age": int(age), "gender": gender, "occupation": occ, "zip_code": zipc}
    return inter, items, users


def _read_grouplens(d: Path) -> tuple[np.ndarray, dict, dict]:
    inter = np.loadtxt(d / "u.data", delimiter="\t", dtype=np.int64, ndmin=2)
    genres = list(GROUPLENS_GENRES)
    if (d / "u.genre").is_file():
        pairs = [ln.split("|") for ln in (d / "u.genre").read_text("latin-1").splitlines() if ln]
        genres = [name for name, _ in sorted(pairs, key=lambda p: int(p[1]))]
    items: dict[str, dict[str, Any]] = {}
    for line in (d / "u.item").read_text("latin-1").splitlines():
        if not line:
            continue
        parts = line.split("|")
        flags = parts[5 : 5 + len(genres)]
        title = parts[1]
        if title.endswith(")") and title[-6:-5] == "(":  # "Toy Story (1995)" as RecBole has it
            title = title[:-7]
        items[parts[0]] = {
            "title": title,
            "year": _year(parts[2]),
            "genres": [g for g, f in zip(genres, flags, strict=False) if f == "1"],
        }
    users: dict[str, dict[str, Any]] = {}
    for line in (d / "u.user").read_text("latin-1").splitlines():
        if line:
            uid, age, gender, occ, zipc = line.split("|")
            users[uid] = {"age": int(age), "gender": gender, "occupation": occ, "zip_code": zipc}
    return inter, items, users


def load_movielens(path: str | os.PathLike | None = None) -> MovieLens:
    """Load MovieLens-100K from either layout into labelled click events.

    >>> ml = load_movielens()
    >>> len(ml), ml.ratings, int(ml.clicks["label"].sum())
    (72855, 100000, 55375)
    """
    d, layout = find_movielens(path)
    inter, items, users = _read_recbole(d) if layout == "recbole" else _read_grouplens(d)
    user, item, rating, ts = inter[:, 0], inter[:, 1], inter[:, 2], inter[:, 3]
    keep = rating != 3
    order = np.argsort(ts[keep], kind="stable")
    user, item, rating, ts = (a[keep][order] for a in (user, item, rating, ts))
    uid, iid = user.astype(str).astype(object), item.astype(str).astype(object)
    clicks = {
        "event_id": np.asarray([f"{u}:{i}" for u, i in zip(uid, iid, strict=True)], dtype=object),
        "ts": ts.astype(np.float64),
        "user_id": uid,
        "item_id": iid,
        "label": (rating >= 4).astype(np.int8),
        "rating": rating.astype(np.int8),
    }
    return MovieLens(clicks, items, users, layout, ratings=len(inter))


def click_events(ml: MovieLens, start: int = 0, stop: int | None = None) -> list[dict[str, Any]]:
    """Click events (docs/design.md "Click event" JSON) for rows ``start:stop``, with ``user``."""
    c = ml.clicks
    return [
        {
            "event_id": c["event_id"][k],
            "ts": float(c["ts"][k]),
            "user_id": c["user_id"][k],
            "item_id": c["item_id"][k],
            "label": int(c["label"][k]),
            "user": ml.users.get(c["user_id"][k]),
        }
        for k in range(start, len(c["ts"]) if stop is None else stop)
    ]
