"""Readers of math problem files: the published eval-set layouts and training prompt sets.

    records, skipped = read_records("math500.jsonl", "math500")   # list[MathRecord], Counter
    path = default_path("aime24")                                  # the real file, or None
    for record in iter_records(path, "prompts", problem_field="q", skipped=counter): ...

Every layout reduces a record to MathRecord(id, problem, answer), all strings. This table is the
one description of the layouts; `tfds_sources` builds TFDS datasets through `iter_records`:

| layout  | file             | problem           | answer                          | id                  |
|---------|------------------|-------------------|---------------------------------|---------------------|
| aime24  | aime24.jsonl     | `problem`         | `answer` ("204")                | `id`                |
| aime25  | aime25.jsonl     | `problem`         | `answer` ("70")                 | line number         |
| amc23   | amc23.jsonl      | `problem`         | `answer`, a number: 27.0 -> "27"| `id`                |
| math500 | math500.jsonl    | `problem` (1)     | `answer` (LaTeX)                | `unique_id`         |
| gsm8k   | gsm8k_test.jsonl | `question`        | `answer` after `####` (2)       | `idx`               |
| prompts | (any, 3)         | `problem_field`   | `answer_field`                  | `id_field` or line  |

(1) MATH500's `problem` starts with the added instruction "Return your final response within
\\boxed{}." which is stripped: the evaluation prompt adds its own instruction.
(2) GSM8K's `answer` is a worked solution ending in "#### 18"; the answer is the text after the
last `####` with thousands separators removed ("1,600" -> "1600"), since a bare "1,600" can read
as the pair (1, 600) to a grader. A record without `####` is skipped as "no #### answer".
(3) `prompts` is the layout of training prompt sets; its field names are arguments, by default
"problem", "answer" and None (the line number).
`LAYOUTS` holds the five published sets (the eval sets); `get_layout` resolves any layout name.

A field becomes text as is, UTF-8 bytes (Parquet binary columns) decoded, a number (int, or a
float holding an integer) as its integer text, other floats as their shortest repr; problem and
answer are stripped. The id is the named field as text, or the 1-based line (row) number when the
layout names none or the record lacks it. Blank lines are not records and are ignored.

Bad records never stop a read: each is skipped and counted by reason in a Counter:
"not valid UTF-8", "not JSON", "not a JSON object", "unreadable row group" (each row of a Parquet
row group that fails to decode or its page checksum), "missing field 'F'", "empty problem",
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
    file name of the published set (None for `prompts`), and the clean-ups of problem and answer."""

    file: str | None
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
PROMPTS = "prompts"  # The layout of training prompt sets, whose field names are arguments.


def get_layout(name: str, *, problem_field: str = "problem", answer_field: str = "answer",
               id_field: str | None = None) -> Layout:
    """The Layout called `name`; the field names apply to the `prompts` layout only."""
    if name == PROMPTS:
        return Layout(None, problem_field, answer_field, id_field)
    if name not in LAYOUTS:
        raise ValueError(f"unknown math set layout {name!r}; known: {', '.join([*LAYOUTS, PROMPTS])}")
    return LAYOUTS[name]


class BadRecord(ValueError):
    """A record that cannot become a MathRecord; `reason` is its skip reason (module docstring)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _as_text(value: Any) -> str | None:
    """A string as is; UTF-8 bytes decoded; a number as its text (27.0 -> "27"); anything else None."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRecord("not valid UTF-8") from None
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    return None


def _jsonl_rows(path: str) -> Iterator[tuple[int, Any]]:
    """(1-based line number, decoded object or BadRecord) per non-blank line."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield line_no, BadRecord("not valid UTF-8")
                continue
            try:
                yield line_no, json.loads(text)
            except json.JSONDecodeError:
                yield line_no, BadRecord("not JSON")


def _parquet_rows(path: str) -> Iterator[tuple[int, Any]]:
    """(1-based row number, row dict or BadRecord) per row; an unreadable row group is all bad."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    pfile, row_no = pq.ParquetFile(path, page_checksum_verification=True), 1
    for group in range(pfile.num_row_groups):
        try:
            rows = pfile.read_row_group(group).to_pylist()
        except Exception:  # noqa: BLE001 - any decode failure of this group skips only its rows.
            rows = [BadRecord("unreadable row group")] * pfile.metadata.row_group(group).num_rows
        for row in rows:
            yield row_no, row
            row_no += 1


def _record(row: Any, line: str, layout: Layout) -> MathRecord:
    """The MathRecord of one decoded row (`line` its id when it names none); raises BadRecord."""
    if isinstance(row, BadRecord):
        raise row
    if not isinstance(row, dict):
        raise BadRecord("not a JSON object")
    for name in (layout.problem, layout.answer):
        if row.get(name) is None:
            raise BadRecord(f"missing field {name!r}")
    problem = layout.clean_problem(_as_text(row[layout.problem]) or "")
    if not problem:
        raise BadRecord("empty problem")
    answer = _as_text(row[layout.answer])
    if answer is None or not answer.strip():
        raise BadRecord("empty answer")
    answer = layout.clean_answer(answer)
    if answer is None:
        raise BadRecord("no #### answer")
    if not answer:
        raise BadRecord("empty answer")
    ident = (_as_text(row.get(layout.id)) or "").strip() if layout.id is not None else ""
    return MathRecord(id=ident or line, problem=problem, answer=answer)


def iter_records(path: str | os.PathLike, layout: str, *, skipped: Counter, problem_field: str = "problem",
                 answer_field: str = "answer", id_field: str | None = None,
                 line_prefix: str = "") -> Iterator[MathRecord]:
    """The records of a JSONL (or .parquet) file in `layout` (module table), in file order.

    Each bad record is skipped and counted in `skipped` by reason. The field names apply to the
    `prompts` layout only; `line_prefix` goes before the line number of a record whose id it is.
    """
    spec = get_layout(layout, problem_field=problem_field, answer_field=answer_field, id_field=id_field)
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"math set file {path} does not exist")
    for line_no, row in (_parquet_rows(path) if path.endswith(".parquet") else _jsonl_rows(path)):
        try:
            yield _record(row, f"{line_prefix}{line_no}", spec)
        except BadRecord as bad:
            skipped[bad.reason] += 1


def read_records(path: str | os.PathLike, layout: str) -> tuple[list[MathRecord], Counter]:
    """Records of a JSONL (or .parquet) file in `layout` (module table), and the skip counts by reason."""
    skipped: Counter = Counter()
    return list(iter_records(path, layout, skipped=skipped)), skipped


def data_dirs() -> list[Path]:
    """Where default_path looks, in order: $TOPD_EVAL_DATA, then <repo root>/../shared/data."""
    dirs = [Path(os.environ[ENV_DATA_DIR])] if os.environ.get(ENV_DATA_DIR) else []
    return dirs + [Path(__file__).resolve().parents[2].parent / "shared" / "data"]


def default_path(name: str, data_dir: str | os.PathLike | None = None) -> str | None:
    """The file of published set `name` in `data_dir` (when given) or the first of data_dirs() holding it;
    None if absent."""
    file = get_layout(name).file
    if file is None:
        raise ValueError(f"layout {name!r} has no published file")
    for directory in ([Path(data_dir)] if data_dir is not None else data_dirs()):
        if (directory / file).is_file():
            return str(directory / file)
    return None


__all__ = ["LAYOUTS", "MATH500_INSTRUCTION", "PROMPTS", "BadRecord", "Layout", "MathRecord", "data_dirs",
           "default_path", "get_layout", "iter_records", "read_records"]
