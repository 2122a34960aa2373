"""Literal prefilters for the rules' regular expressions.

Most graph edges are checked against path patterns they cannot match (a ``create`` under
``/home`` against ``/systemd/(system|user)/|^/etc/systemd/|...``), and a ``str.__contains__``
on a literal the pattern needs costs a small fraction of ``re.Pattern.search``. So a
pattern's search runs only when the text holds one of :func:`required_literals`: every
match of the pattern contains one of them, so a text without any has no match and the
gate changes no result (the same idea as RE2's prefilter, on the parse tree that
``re`` itself compiles from).
"""

from __future__ import annotations

import re
from re import _parser as sre_parse  # the parse tree re compiles; stable across 3.11-3.13

#: a literal shorter than this passes on most paths: the gate would cost without saving
MIN_LITERAL = 3

_REPEATS = tuple(getattr(sre_parse, name) for name in ("MAX_REPEAT", "MIN_REPEAT",
                                                       "POSSESSIVE_REPEAT")
                 if hasattr(sre_parse, name))


def required_literals(rx: re.Pattern) -> tuple[str, ...] | None:
    r"""Strings one of which every match of *rx* contains, or ``None`` when none of at
    least :data:`MIN_LITERAL` characters can be told (a case-insensitive pattern, a
    bytes pattern, one built of classes and repeats only).

    >>> required_literals(re.compile(r"/\.config/autostart/|^/etc/xdg/autostart/"))
    ('/.config/autostart/', '/etc/xdg/autostart/')
    >>> required_literals(re.compile(r"/systemd/(system|user)/|^/etc/systemd/"))  # implied
    ('/systemd/',)
    >>> required_literals(re.compile(r"\.log(\.\d+)?$|/(wtmp|btmp)$"))
    ('.log', 'wtmp', 'btmp')
    >>> required_literals(re.compile(r"(?i)secret")) is None
    True
    """
    if not isinstance(rx.pattern, str) or rx.flags & re.IGNORECASE:
        return None
    found = _required(sre_parse.parse(rx.pattern, rx.flags))
    if found is None:
        return None
    # a string that holds another of the set is implied by it: test only the other
    kept = [s for s in found if not any(t != s and t in s for t in found)]
    return tuple(sorted(set(kept), key=kept.index))


def _score(cands: list[str]) -> tuple[int, int]:
    return (min(map(len, cands)), -len(cands))


def _required(items) -> list[str] | None:
    """Required strings of a sequence of parse-tree items: the best one item's (a run of
    literals matches itself, a branch one of its alternatives, a group its content, a
    repeat of at least one its body); ``None`` if no item gives any."""
    best: list[str] | None = None
    run: list[str] = []

    def consider(cands: list[str] | None) -> None:
        nonlocal best
        if cands and min(map(len, cands)) >= MIN_LITERAL and (
                best is None or _score(cands) > _score(best)):
            best = cands

    for op, av in items:
        if op is sre_parse.LITERAL:
            run.append(chr(av))
            continue
        if run:
            consider(["".join(run)])
            run = []
        if op is sre_parse.SUBPATTERN:
            _group, add_flags, _del_flags, sub = av
            if not add_flags & re.IGNORECASE:
                consider(_required(sub))
        elif op is sre_parse.BRANCH:
            alternatives = [_required(b) for b in av[1]]
            if all(a is not None for a in alternatives):
                consider([s for a in alternatives for s in a])
        elif op in _REPEATS:
            low, _high, sub = av
            if low >= 1:
                consider(_required(sub))
        elif op is getattr(sre_parse, "ATOMIC_GROUP", None):
            consider(_required(av))
        # anything else (classes, anchors, look-arounds, back references) needs no
        # literal of its own, and ends the run: the gate stays on the safe side
    if run:
        consider(["".join(run)])
    return best


def gated_search(rx: re.Pattern):
    r"""``text -> bool``: whether *rx* finds a match in *text*, exactly as
    ``rx.search(text) is not None``, trying the search only when *text* holds one of
    the pattern's :func:`required_literals`.

    >>> found = gated_search(re.compile(r"/\.ssh/authorized_keys2?$"))
    >>> found("/root/.ssh/authorized_keys"), found("/home/a/notes.txt")
    (True, False)
    """
    search = rx.search
    lits = required_literals(rx)
    if lits is None:
        return lambda text: search(text) is not None
    if len(lits) == 1:
        (lit,) = lits
        return lambda text: lit in text and search(text) is not None

    def found(text: str) -> bool:
        for lit in lits:
            if lit in text:
                return search(text) is not None
        return False

    return found


def leading_strings(rx: re.Pattern, n: int) -> frozenset[str] | None:
    r"""Every string of *n* characters that a match of *rx* at the start of a text can
    begin with, lower-cased, or ``None`` when they cannot be told from the pattern's
    leading literals, optional literals, groups and branches (or one may be shorter).

    >>> sorted(leading_strings(re.compile(r"^\.?(sshd|cron)$", re.IGNORECASE), 3))
    ['.cr', '.ss', 'cro', 'ssh']
    >>> leading_strings(re.compile(r"^a[bc]d"), 3) is None
    True
    """
    if not isinstance(rx.pattern, str):
        return None
    found = _leading(list(sre_parse.parse(rx.pattern, rx.flags)), n)
    return None if found is None else frozenset(s.lower() for s in found)


def _leading(items: list, n: int) -> set[str] | None:
    """The *n*-character beginnings of a match of the sequence of parse-tree *items*."""
    if n == 0:
        return {""}
    if not items:
        return None  # a match may end before n characters
    (op, av), rest = items[0], items[1:]
    if op is sre_parse.AT and av is sre_parse.AT_BEGINNING:
        return _leading(rest, n)
    if op is sre_parse.LITERAL:
        tail = _leading(rest, n - 1)
        return None if tail is None else {chr(av) + t for t in tail}
    if op is sre_parse.SUBPATTERN:
        _group, add_flags, del_flags, sub = av
        if add_flags or del_flags:
            return None
        return _leading(list(sub) + rest, n)
    if op is sre_parse.BRANCH:
        out: set[str] = set()
        for alt in av[1]:
            got = _leading(list(alt) + rest, n)
            if got is None:
                return None
            out |= got
        return out
    if op in _REPEATS and av[0] == 0 and av[1] == 1:  # an optional part: with or without
        without = _leading(rest, n)
        with_ = _leading(list(av[2]) + rest, n)
        return None if without is None or with_ is None else without | with_
    return None
