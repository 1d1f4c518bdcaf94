"""Readers for the published layouts of the math evaluation sets (TOPD.md, section 7).

    records, skipped = read_records("math500.jsonl", "math500")   # list[MathRecord], Counter
    path = default_path("aime24")                                  # the real file, or None

Every layout reduces a record to MathRecord(id, problem, answer), all strings:

| layout  | file             | problem    | answer                          | id             |
|---------|------------------|------------|---------------------------------|----------------|
| aime24  | aime24.jsonl     | `problem`  | `answer` ("204")                | `id`           |
| aime25  | aime25.jsonl     | `problem`  | `answer` ("70")                 | line number    |
| amc23   | amc23.jsonl      | `problem`  | `answer`, a number: 27.0 -> "27"| `id`           |
| math500 | math500.jsonl    | `problem` (1) | `answer` (LaTeX)             | `unique_id`    |
| gsm8k   | gsm8k_test.jsonl | `question` | `answer` after `####` (2)       | `idx`          |

(1) MATH500's `problem` starts with the added instruction "Return your final response within
\\boxed{}." which is stripped: the evaluation prompt adds its own instruction.
(2) GSM8K's `answer` is a worked solution ending in "#### 18"; the answer is the text after the
last `####` with thousands separators removed ("1,600" -> "1600"), since a bare "1,600" can read
as the pair (1, 600) to a grader. A record without `####` is skipped as "no #### answer".

A numeric answer (int, or a float holding an integer) becomes its integer text; other floats their
shortest repr. The id is the named field as text, or the 1-based line (row) number when the layout
names none or the record lacks it. Blank lines are not records and are ignored.

Bad records never stop a read: each is skipped and counted by reason in the returned Counter:
"not valid UTF-8", "not JSON", "not a JSON object", "missing field 'F'", "empty problem",
"empty answer" (also a non-text, non-number answer), "no #### answer".
Files ending in .parquet are read with pyarrow (rows as records); anything else is JSONL.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

MATH500_INSTRUCTION = "Return your final response within \\boxed{}."
ENV_DATA_DIR = "TOPD_EVAL_DATA"


@dataclasses.dataclass(frozen=True)
class MathRecord:
    """One problem with its reference answer; `id` is unique within its file."""

    id: str
    problem: str
    answer: str


def _strip_math500_instruction(problem: str) -> str:
    return problem[len(MATH500_INSTRUCTION):].lstrip() if problem.startswith(MATH500_INSTRUCTION) else problem


def _gsm8k_answer(answer: str) -> str | None:
    if "####" not in answer:
        return None
    return re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", answer.rsplit("####", 1)[1].strip())


@dataclasses.dataclass(frozen=True)
class Layout:
    """Which fields of a record hold the problem, the answer and the id (None = line number), the
    file name of the published set, and the clean-ups of problem and answer text."""

    file: str
    problem: str
    answer: str
    id: str | None
    clean_problem: Callable[[str], str] = str.strip
    clean_answer: Callable[[str], str | None] = str.strip


LAYOUTS: dict[str, Layout] = {
    "aime24": Layout("aime24.jsonl", "problem", "answer", "id"),
    "aime25": Layout("aime25.jsonl", "problem", "answer", None),
    "amc23": Layout("amc23.jsonl", "problem", "answer", "id"),
    "math500": Layout("math500.jsonl", "problem", "answer", "unique_id",
                      clean_problem=lambda p: _strip_math500_instruction(p.strip())),
    "gsm8k": Layout("gsm8k_test.jsonl", "question", "answer", "idx", clean_answer=_gsm8k_answer),
}


def _layout(name: str) -> Layout:
    if name not in LAYOUTS:
        raise ValueError(f"unknown math set layout {name!r}; known: {', '.join(LAYOUTS)}")
    return LAYOUTS[name]


def _as_text(value: Any) -> str | None:
    """A string as is; a number as its text (27.0 -> "27"); anything else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    return None


def _rows(path: str) -> Iterator[tuple[int, Any]]:
    """(1-based line or row number, decoded record or the reason it cannot be decoded)."""
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow") from None
        yield from enumerate(pq.read_table(path).to_pylist(), start=1)
        return
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield line_no, _Bad("not valid UTF-8")
                continue
            try:
                yield line_no, json.loads(text)
            except json.JSONDecodeError:
                yield line_no, _Bad("not JSON")


@dataclasses.dataclass(frozen=True)
class _Bad:
    reason: str


def _record(line_no: int, row: Any, layout: Layout) -> MathRecord | str:
    """The MathRecord of one decoded row, or the reason it is skipped."""
    if isinstance(row, _Bad):
        return row.reason
    if not isinstance(row, dict):
        return "not a JSON object"
    for name in (layout.problem, layout.answer):
        if name not in row or row[name] is None:
            return f"missing field {name!r}"
    problem = row[layout.problem]
    problem = layout.clean_problem(problem) if isinstance(problem, str) else ""
    if not problem:
        return "empty problem"
    answer = _as_text(row[layout.answer])
    if answer is None or not answer.strip():
        return "empty answer"
    answer = layout.clean_answer(answer)
    if answer is None:
        return "no #### answer"
    if not answer:
        return "empty answer"
    ident = _as_text(row.get(layout.id)) if layout.id is not None else None
    return MathRecord(id=ident if ident else str(line_no), problem=problem, answer=answer)


def read_records(path: str | os.PathLike, layout: str) -> tuple[list[MathRecord], Counter]:
    """Records of a JSONL (or .parquet) file in `layout` (module table), and the skip counts by reason."""
    spec = _layout(layout)
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"math set file {path} does not exist")
    records: list[MathRecord] = []
    skipped: Counter = Counter()
    for line_no, row in _rows(path):
        result = _record(line_no, row, spec)
        if isinstance(result, str):
            skipped[result] += 1
        else:
            records.append(result)
    return records, skipped


def data_dirs() -> list[Path]:
    """Where default_path looks, in order: $TOPD_EVAL_DATA, then <repo root>/../shared/data."""
    dirs = [Path(os.environ[ENV_DATA_DIR])] if os.environ.get(ENV_DATA_DIR) else []
    return dirs + [Path(__file__).resolve().parents[2].parent / "shared" / "data"]


def default_path(name: str, data_dir: str | os.PathLike | None = None) -> str | None:
    """The file of set `name` in `data_dir` (when given) or the first of data_dirs() holding it; None if absent."""
    file = _layout(name).file
    for directory in ([Path(data_dir)] if data_dir is not None else data_dirs()):
        if (directory / file).is_file():
            return str(directory / file)
    return None


__all__ = ["LAYOUTS", "Layout", "MathRecord", "data_dirs", "default_path", "read_records"]
