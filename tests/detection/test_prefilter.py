"""The rules' literal prefilter: a gated search finds exactly what the search finds."""

from __future__ import annotations

import doctest
import random
import re

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import detection.prefilter
from detection.prefilter import gated_search, required_literals
from detection.rules import RuleSet

from .conftest import corpus_files


def _rule_patterns() -> list[re.Pattern]:
    """Every path and argv pattern of the shipped rules, and the named ones."""
    rs = RuleSet.load()
    found = dict.fromkeys(rs.patterns.values())
    for path in sorted(detection.rules.RULES_DIR.glob("*.yaml")):
        for rule in yaml.safe_load(path.read_text()).get("rules") or ():
            for key in ("path", "path_not", "argv", "argv_not"):
                if key in rule:
                    found[rs._rx(rule[key])] = None
    return list(found)


PATTERNS = _rule_patterns()
#: shapes the analysis must get right beyond the rules: branches in groups, repeats,
#: look-arounds between literals, flags, optional parts, classes only
EXTRA = [re.compile(p, f) for p, f in [
    (r"ab(cd|ef)+gh?", 0), (r"(?<!x)abc(?=d)e", 0), (r"(?i:abc)def", 0), (r"abc|(?i:def)", 0),
    (r"(abc)?de", 0), (r"x*yzw{0,2}", 0), (r"[abc]{3}", 0), (r"a.b.c", 0), (r"^abc$|xyz", 0),
    (r"(?>abc)d", 0), (r"(abc|abd)e", 0), (r"ab\.cd", re.VERBOSE), (r"(?i)abc", 0),
    (r"a(?P<g>bcd)(?P=g)", 0), (r"(ab)(?(1)cde|fgh)", 0),
]]


def _alphabet(patterns) -> str:
    chars = {c for rx in patterns for c in rx.pattern if c.isprintable()}
    return "".join(sorted(chars | set("abcdefghijklmnopqrstuvwxyzABC/._- 0123456789")))


def test_doctests():
    assert doctest.testmod(detection.prefilter, optionflags=doctest.ELLIPSIS).failed == 0


def test_literals_of_the_rules_are_found():
    lits = {rx.pattern: required_literals(rx) for rx in PATTERNS}
    gated = [p for p, v in lits.items() if v]
    assert len(gated) >= 15  # the path patterns, which most file edges meet
    assert lits[RuleSet.load().patterns["log"].pattern] is not None
    assert required_literals(re.compile(r"(?i)passw|secret")) is None
    assert required_literals(re.compile(r"[a-z]+\d")) is None
    assert required_literals(re.compile(r"abc|(?i:def)")) is None  # one branch without
    assert required_literals(re.compile(r"(?i:abc)defg")) == ("defg",)


def _check(patterns, texts):
    for rx in patterns:
        lits = required_literals(rx)
        found = gated_search(rx)
        for text in texts:
            want = rx.search(text) is not None
            assert found(text) == want, (rx.pattern, text)
            if want and lits is not None:
                assert any(lit in text for lit in lits), (rx.pattern, text)


def test_same_as_search_on_corpus_paths_and_their_mutants():
    texts = set()
    for p in corpus_files():
        texts.update(re.findall(r'(?:name|cwd|exe)="([^"]*)"', p.read_text(errors="replace")))
    if not texts:
        pytest.skip("audit corpus not found")
    texts.update(["/var/log/syslog", "/home/u/.bashrc", "/etc/cron.d/x", "/var/spool/cron/u",
                  "/etc/ssh/authorized_keys", "/root/.ssh/authorized_keys2", "/x/logs/a",
                  "/a/.git/logs/HEAD", "/var/run/utmp", "/tmp/.x/y", "/dev/shm/.z",
                  "/run/user/1000/.a", "/etc/ld.so.preload", "/etc/sudoers.d/a", "a.log.1.gz"])
    rng = random.Random(16)
    alphabet = _alphabet(PATTERNS)
    base = sorted(texts)
    for _ in range(20_000):
        s = list(rng.choice(base))
        for _ in range(rng.randint(1, 3)):
            pos = rng.randint(0, len(s))
            if rng.random() < 0.5 or not s:
                s.insert(pos, rng.choice(alphabet))
            else:
                del s[min(pos, len(s) - 1)]
        texts.add("".join(s))
    _check(PATTERNS + EXTRA, sorted(texts))


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(["/", ".", "log", "tmp", "etc", "ssh", "history", "bashrc",
                                 "systemd", "cron", "spool", "var", "home", "a", "1", " ", "-",
                                 "authorized_keys", "autostart", "config", "shadow", "abc",
                                 "def", "gh", "cd", "ef", "x", "d", "e", "gz", "_"]),
                max_size=12).map("".join))
def test_same_as_search_on_generated_texts(text):
    _check(PATTERNS + EXTRA, [text])
