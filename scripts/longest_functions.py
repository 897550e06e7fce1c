"""Print the longest functions in stages/ (lines from ``def`` to the last line of the body).

    python scripts/longest_functions.py [--top N] [--max LINES]

Exit 1 when a function is longer than ``--max`` (default 60): tests/test_code_shape.py runs it.
"""
from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def function_lengths(root: Path = ROOT / "stages") -> list[tuple[int, str, str]]:
    rows = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                rows.append((node.end_lineno - node.lineno + 1,
                             f"{path.relative_to(root.parent)}:{node.lineno}", node.name))
    return sorted(rows, reverse=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--max", type=int, default=60)
    args = parser.parse_args(argv)
    rows = function_lengths()
    print(f"{'lines':>5}  function")
    for lines, where, name in rows[:args.top]:
        print(f"{lines:>5}  {name}  ({where})")
    over = [r for r in rows if r[0] > args.max]
    if over:
        print(f"{len(over)} function(s) over {args.max} lines", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
