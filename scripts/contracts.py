#!/usr/bin/env python3
"""Write the events' JSON Schemas (``streams.contracts``) to ``docs/schemas/``.

usage: python scripts/contracts.py   (from the project's root, with the project installed)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from streams.contracts import all_schemas  # noqa: E402


def render(schema: dict) -> str:
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def main() -> int:
    out = ROOT / "docs" / "schemas"
    out.mkdir(parents=True, exist_ok=True)
    for name, schema in all_schemas().items():
        (out / f"{name}.schema.json").write_text(render(schema))
        print(f"wrote docs/schemas/{name}.schema.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
