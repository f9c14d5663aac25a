"""Reading a benchmark's annotation files (JSON, CSV, id lists), each error naming the file and what it expected."""

from __future__ import annotations

import csv
import json
from typing import Any, Sequence

from etils import epath


def read_json(path: epath.PathLike) -> Any:
    """The parsed JSON file; ValueError naming the file if it is not JSON (a cut-off download)."""
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None


def read_list(path: epath.PathLike) -> list[str]:
    """Non-empty stripped lines of a text file (a split's video ids)."""
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def read_csv(path: epath.PathLike, columns: Sequence[str]) -> list[dict[str, str]]:
    """Rows of a CSV with a header that must contain `columns`."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(
                f"{path}: expected columns {list(columns)}, missing {missing} (header: {reader.fieldnames})"
            )
        return list(reader)
