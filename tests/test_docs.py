"""The docs stand alone: every file path that README, docs, BENCHMARKS and the code's
docstrings and comments cite is a file inside this repo.

Pure file reads, no imports of the product. A citation is a relative path ending in
``.md``, ``.py``, ``.json`` or ``.yaml``; it resolves against the repo root or against
the citing file's directory (Markdown links), and must land inside the repo. A bare
file name (``contracts.md``) must name a file somewhere in the repo's sources, unless
it is listed in ``NOT_FILES`` as a name of something else.
"""

from __future__ import annotations

import ast
import io
import os
import re
import tokenize
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CODE_DIRS = ("core", "headwater", "streams", "features", "learner", "detection", "serving",
             "bench", "scripts")
# Directories that hold run-time output, not sources: a name found only there is not "in the repo".
NOT_SOURCES = {".venv", ".git", ".headwater", ".hypothesis", ".pytest_cache", ".ruff_cache",
               "artifacts", "headwater.egg-info", "__pycache__"}
# Bare names that look like files but name something else.
NOT_FILES = {
    "msgspec.json": "the msgspec.json module",
    "manifest.json": "written beside each checkpoint in the model store at run time",
    "pins.json": "written into the model store at run time",
    "pos.json": "the audit tailer's position file, written at run time",
    "OUT/meta.json": "a placeholder for the recorder's output directory",
    "news.yaml": "an example feature definition (docs/features.md)",
    "my.yaml": "an example feature definition name (README)",
    "f.yaml": "a made-up file name in a doctest of features/definition.py",
}
# Cited but missing; strict xfail, so the day the file exists the mark must go.
KNOWN_MISSING = {
    "tests/test_architecture.py": "cited by scripts/architecture.py and the docs/architecture.md "
                                  "it generates, never written",
}

CITATION = re.compile(
    r"(?<![\w./~:@$<>{}-])((?:\.{1,2}/)*(?:[\w.-]+/)*[\w-][\w.-]*\.(?:md|py|json|yaml))(?![\w/-])"
)
OUTSIDE = re.compile(r"(?:\.\./|/work/)shared/\S*?\.(?:md|py|json|yaml)\b")
PRINCIPLE = re.compile(r"docs/design\.md`?\s+principle\s+(\d+)")


def _cited_in_python(path: Path) -> list[str]:
    """Docstrings and comments of one module: the parts of a .py file that are prose."""
    source = path.read_text(encoding="utf-8")
    texts = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                texts.append(doc)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            texts.append(tok.string)
    return texts


@cache
def _documents() -> dict[Path, str]:
    """Every citing document and its prose."""
    md = [REPO / "README.md", REPO / "BENCHMARKS.md", *sorted((REPO / "docs").glob("*.md")),
          *sorted((REPO / "bench" / "results").glob("*.md"))]
    docs = {p: p.read_text(encoding="utf-8") for p in md}
    for d in CODE_DIRS:
        for p in sorted((REPO / d).rglob("*.py")):
            if not NOT_SOURCES & set(p.relative_to(REPO).parts):
                docs[p] = "\n".join(_cited_in_python(p))
    return docs


@cache
def _source_names() -> frozenset[str]:
    names: set[str] = set()
    for _root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in NOT_SOURCES]
        names.update(files)
    return frozenset(names)


def _resolves(citing: Path, cited: str) -> bool:
    if "/" not in cited and cited in _source_names():
        return True
    for base in (REPO, citing.parent):
        target = (base / cited).resolve()
        if target.is_relative_to(REPO) and target.is_file():
            return True
    return False


def unresolved(citing: Path, text: str) -> list[str]:
    """The paths ``text`` cites that are not files inside the repo."""
    found = [m.group(1) for m in CITATION.finditer(text)]
    return [c for c in found if c not in NOT_FILES and not _resolves(citing, c)]


def _citations() -> dict[str, list[Path]]:
    cited: dict[str, list[Path]] = {}
    for path, text in _documents().items():
        for m in CITATION.finditer(text):
            if m.group(1) not in NOT_FILES:
                cited.setdefault(m.group(1), []).append(path)
    return dict(sorted(cited.items()))


CITED = _citations()
CASES = [
    pytest.param(c, marks=pytest.mark.xfail(strict=True, reason=KNOWN_MISSING[c]))
    if c in KNOWN_MISSING else c
    for c in CITED
]


@pytest.mark.parametrize("cited", CASES)
def test_cited_path_is_a_file_in_the_repo(cited):
    citing = [str(p.relative_to(REPO)) for p in CITED[cited] if not _resolves(p, cited)]
    assert not citing, f"{cited} is cited by {citing} but is not a file in the repo"


def test_nothing_cites_the_shared_folder():
    hits = [f"{p.relative_to(REPO)}: {m.group(0)}"
            for p, text in _documents().items() for m in OUTSIDE.finditer(text)]
    assert not hits


def test_cited_design_principles_exist():
    design = (REPO / "docs" / "design.md").read_text(encoding="utf-8")
    principles = design.split("## Principles", 1)[1].split("\n## ", 1)[0]
    numbers = set(re.findall(r"^(\d+)\. \*\*", principles, flags=re.M))
    assert numbers == {str(n) for n in range(1, 8)}
    cited = {(str(p.relative_to(REPO)), n)
             for p, text in _documents().items() for n in PRINCIPLE.findall(text)}
    assert {n for _, n in cited} >= {"4", "7"}  # serving/scoring.py, features/store.py
    assert not [c for c in cited if c[1] not in numbers]


def test_the_check_catches_what_it_should():
    """The checker is not vacuous: it reads the real citations and flags broken ones."""
    assert "docs/design.md" in CITED and "docs/protocol.md" in CITED
    assert REPO / "serving" / "metrics.py" in CITED["docs/style.md"]
    readme = REPO / "README.md"
    text = ("Design: `../shared/DESIGN.md`, see DESIGN.md, [x](docs/nope.md#a), "
            "`docs/papers.md`; fine: `docs/design.md`, [c](docs/contracts.md), manifest.json")
    assert unresolved(readme, text) == ["../shared/DESIGN.md", "DESIGN.md", "docs/nope.md",
                                        "docs/papers.md"]
    assert OUTSIDE.search(text)
    assert unresolved(REPO / "docs" / "design.md", "[d](decisions.md), [r](../README.md)") == []
