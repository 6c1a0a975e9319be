"""A benchmark's figures as text, printed from the JSON it writes (the one form both take).

python -m loadtests.report step.json      # print a saved run again
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _scalar(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def _table(rows: list[dict], indent: str) -> list[str]:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    cells = [[_scalar(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    numeric = [all(_is_number(row.get(c)) for row in rows) for c in columns]  # right-aligned

    def line(values: list[str]) -> str:
        return indent + "  ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric)).rstrip()

    return [line(columns)] + [line(r) for r in cells]


def _is_number(value: object) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _lines(value: dict, indent: str = "") -> list[str]:
    lines = []
    for key, item in value.items():
        if key == "goals":
            continue
        if (
            isinstance(item, dict)
            and all(isinstance(v, dict) and not any(isinstance(x, dict) for x in v.values()) for v in item.values())
            and item
        ):
            lines.append(f"{indent}{key}:")
            lines += _table([{"": k, **v} for k, v in item.items()], indent + "  ")
        elif isinstance(item, dict) and item:
            lines.append(f"{indent}{key}:")
            lines += _lines(item, indent + "  ")
        elif isinstance(item, list) and item and all(isinstance(v, dict) for v in item):
            lines.append(f"{indent}{key}:")
            lines += _table(item, indent + "  ")
        else:
            lines.append(f"{indent}{key}: {_scalar(item)}")
    return lines


def render(result: dict) -> str:
    lines = _lines(result)
    if result.get("goals"):
        lines.append("goals:")
        lines += [
            f"  [{'met' if g['met'] else 'NOT MET'}] {g['goal']}: {_scalar(g['measured'])}" for g in result["goals"]
        ]
    return "\n".join(lines)


def main() -> None:
    print(render(json.loads(Path(sys.argv[1]).read_text())))


if __name__ == "__main__":
    main()
