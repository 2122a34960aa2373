#!/usr/bin/env python3
"""The product's import graph: checks its rules and draws ``docs/architecture.md``.

usage:
    python scripts/architecture.py            # rewrite docs/architecture.md
    python scripts/architecture.py --check    # exit 1 on a rule broken or a stale document

Rules (``tests/test_architecture.py`` runs ``--check`` in ``make test``):
1. No import cycle between modules.
2. Arrows point down the layers in ``LAYERS``: a package imports only packages on a
   lower layer (``core`` is the leaf, ``headwater`` the top).
3. No private reach-ins: no ``from m import _name`` across modules, and no ``x._name``
   (nor ``getattr(x, "_name")``, ``setattr``, ``hasattr``, ``delattr``) unless ``x`` is
   ``self``/``cls`` or a class the module itself defines. That the module defines some
   ``_name`` of its own does not make ``x._name`` its own: ``x`` may be anything.
   Third-party internals we must touch are listed in ``ALLOWED_REACH_INS`` with the reason.

Imports inside functions count like any other: a lazy import is still an arrow.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "architecture.md"

#: Lowest first. A package may import only packages on a strictly lower layer.
LAYERS: list[tuple[str, ...]] = [
    ("core",),
    ("features", "learner", "detection"),
    ("streams",),
    ("serving",),
    ("headwater",),
]
PACKAGES = [p for layer in LAYERS for p in layer]
LAYER_OF = {p: i for i, layer in enumerate(LAYERS) for p in layer}

#: (module, attribute) -> why a private attribute of a third-party object is touched.
ALLOWED_REACH_INS: dict[tuple[str, str], str] = {
    ("serving.scoring", "_ready"):
        "asyncio has no public 'is anything else ready this turn'; coalesced reads need it "
        "to read a lone request at once (a loop without it is treated as busy)",
    ("streams.app", "_fetch_max_wait_ms"):
        "aiokafka has no public setter; Faust hard-codes 1.5 s, wrong for Tansu's long poll",
    ("learner.metrics", "_mean"):
        "River's LogLoss keeps its running mean private; checkpoints must restore it",
    ("streams.learner_runner", "_exit"):
        "os._exit: leave without the interpreter's teardown once a learner group has published",
    ("streams.app", "_create_worker_consumer"):
        "Faust builds its aiokafka consumer here; wrapped to set the fetch wait (above)",
    ("streams.app", "_headwater_patched"):
        "our own marker on Faust's consumer class: patch its fetch wait once per process",
    ("serving.app", "_server"):
        "aiohttp's TCPSite keeps its asyncio.Server private; the bound port is read from it",
}

#: Built-ins that reach an attribute named by a string.
_ATTR_FUNCTIONS = {"getattr", "setattr", "hasattr", "delattr"}


def modules() -> dict[str, Path]:
    """Every module of the product packages, by dotted name."""
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def _resolve(target: str, mods: dict[str, Path]) -> str | None:
    while target and target not in mods:
        target = target.rpartition(".")[0]
    return target or None


def graph(mods: dict[str, Path]) -> tuple[dict[str, set[str]], list[str]]:
    """Module -> the product modules it imports; plus the private reach-ins found."""
    edges: dict[str, set[str]] = {m: set() for m in mods}
    reach_ins: list[str] = []
    for name, path in mods.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        # self/cls only as the receiver of a method: a module that binds a variable of
        # that name (``cls = SomeoneElsesClass``) does not get them.
        rebound = {t.id for n in ast.walk(tree) if isinstance(n, ast.Assign)
                   for t in n.targets if isinstance(t, ast.Name)}
        owners = ({"self", "cls"} - rebound) | {n.name for n in ast.walk(tree)
                                                if isinstance(n, ast.ClassDef)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                subs = [f"{base}.{a.name}" for a in node.names]
                targets = [t for t in subs if t in mods] or [base]
                if base in mods and base != name:
                    reach_ins += [f"{name}:{node.lineno} imports {a.name} from {base}"
                                  for a in node.names if _private(a.name)]
            else:
                reached = _reached(node)
                if (reached is not None and _private(reached[1])
                        and not (isinstance(reached[0], ast.Name) and reached[0].id in owners)
                        and (name, reached[1]) not in ALLOWED_REACH_INS):
                    reach_ins.append(f"{name}:{node.lineno} reaches into {ast.unparse(node)}")
                continue
            for target in targets:
                module = _resolve(target, mods)
                if module and module != name and not name.startswith(module + "."):
                    edges[name].add(module)
    return edges, reach_ins


#: Public API spelled with an underscore (namedtuple's methods).
PUBLIC_UNDERSCORED = {"_replace", "_asdict", "_fields", "_make", "_field_defaults"}


def _reached(node: ast.AST) -> tuple[ast.expr, str] | None:
    """(object, attribute name) of ``x.name`` or ``getattr(x, "name")`` and its kin."""
    if isinstance(node, ast.Attribute):
        return node.value, node.attr
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id in _ATTR_FUNCTIONS and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
        return node.args[0], node.args[1].value
    return None


def _private(attr: str) -> bool:
    return attr.startswith("_") and not attr.startswith("__") and attr not in PUBLIC_UNDERSCORED


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def package_arrows(edges: dict[str, set[str]]) -> dict[tuple[str, str], int]:
    arrows: dict[tuple[str, str], int] = defaultdict(int)
    for source, targets in edges.items():
        for target in targets:
            a, b = source.split(".")[0], target.split(".")[0]
            if a != b:
                arrows[(a, b)] += 1
    return dict(arrows)


def problems(edges: dict[str, set[str]], reach_ins: list[str]) -> list[str]:
    found = [f"module cycle: {' -> '.join(c)}" for c in cycles(edges)]
    for (a, b), n in sorted(package_arrows(edges).items()):
        if LAYER_OF[b] >= LAYER_OF[a]:
            found.append(f"arrow {a} -> {b} ({n} imports) does not point down the layers")
    return found + [f"private reach-in: {r}" for r in reach_ins]


def render(mods: dict[str, Path], edges: dict[str, set[str]]) -> str:
    arrows = package_arrows(edges)
    lines = [
        "# Architecture: the import graph",
        "",
        "Generated by `python scripts/architecture.py` (do not edit by hand); "
        "`tests/test_architecture.py` fails when this page is stale, when a module cycle "
        "appears, when an arrow points up the layers, or on a private reach-in across modules.",
        "",
        "## Layers (a package imports only packages below it)",
        "",
        "| layer | packages | modules |",
        "|---:|---|---:|",
    ]
    for i, layer in reversed(list(enumerate(LAYERS))):
        count = sum(1 for m in mods if m.split(".")[0] in layer)
        lines.append(f"| {i} | {', '.join(f'`{p}`' for p in layer)} | {count} |")
    lines += ["", "## Package arrows (number of module-to-module imports)", "", "```mermaid",
              "flowchart TD"]
    for (a, b), n in sorted(arrows.items()):
        lines.append(f"    {a} -->|{n}| {b}")
    lines += ["```", "", "## Modules and what they import from other packages", ""]
    for package in PACKAGES:
        lines.append(f"### `{package}`")
        lines.append("")
        for module in sorted(m for m in mods if m.split(".")[0] == package):
            outside = sorted(t for t in edges[module] if t.split(".")[0] != package)
            inside = sorted(t for t in edges[module] if t.split(".")[0] == package)
            parts = []
            if inside:
                parts.append("same package: " + ", ".join(f"`{t}`" for t in inside))
            if outside:
                parts.append("below: " + ", ".join(f"`{t}`" for t in outside))
            lines.append(f"- `{module}`" + (" — " + "; ".join(parts) if parts else ""))
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    mods = modules()
    edges, reach_ins = graph(mods)
    found = problems(edges, reach_ins)
    for problem in found:
        print(problem, file=sys.stderr)
    text = render(mods, edges)
    if "--check" in argv:
        if not DOC.exists() or DOC.read_text() != text:
            print(f"{DOC.relative_to(ROOT)} is stale: run python scripts/architecture.py", file=sys.stderr)
            return 1
    else:
        DOC.write_text(text)
    print(f"architecture: {len(mods)} modules, {sum(map(len, edges.values()))} imports, "
          f"{len(found)} problems")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
