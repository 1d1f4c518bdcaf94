"""math_sets: the published eval-set layouts read into MathRecords; bad records skipped and counted."""

import json
from pathlib import Path

import pytest

from collections import Counter

from topd_jax.data.math_sets import (LAYOUTS, MATH500_INSTRUCTION, MathRecord, default_path, iter_records,
                                     read_records)

CANDIDATES = (Path(__file__).resolve().parents[2] / ".." / "shared" / "data", Path("/work/shared/data"))
DATA = next((p.resolve() for p in CANDIDATES if (p / "math500.jsonl").is_file()), None)
needs_data = pytest.mark.skipif(DATA is None, reason=f"real eval files not found in any of {[str(p) for p in CANDIDATES]}")


@needs_data
@pytest.mark.parametrize("name, count", [("aime24", 30), ("aime25", 30), ("amc23", 40), ("math500", 500),
                                         ("gsm8k", 1319)])
def test_each_real_file_reads_whole(name, count):
    records, skipped = read_records(DATA / LAYOUTS[name].file, name)
    assert len(records) == count and not skipped
    assert len({r.id for r in records}) == count
    assert all(r.problem.strip() == r.problem and r.problem and r.answer for r in records)


@needs_data
def test_math500_instruction_is_stripped_and_answer_is_latex():
    records, _ = read_records(DATA / "math500.jsonl", "math500")
    assert not any("Return your final response" in r.problem for r in records)
    assert records[0] == MathRecord(id="test/precalculus/807.json",
                                    problem=records[0].problem, answer="\\left( 3, \\frac{\\pi}{2} \\right)")
    assert records[0].problem.startswith("Convert the point $(0,3)$")


@needs_data
def test_gsm8k_answer_is_the_number_after_hashes_without_commas():
    records, _ = read_records(DATA / "gsm8k_test.jsonl", "gsm8k")
    assert records[0].id == "0" and records[0].answer == "18"
    assert records[0].problem.startswith("Janet\u2019s ducks lay 16 eggs")
    assert all(r.answer.lstrip("-").replace(".", "", 1).isdigit() for r in records)


@needs_data
def test_amc23_numbers_become_integer_text_and_aime25_ids_are_line_numbers():
    amc, _ = read_records(DATA / "amc23.jsonl", "amc23")
    assert [r.answer for r in amc[:4]] == ["27", "36", "45", "3159"] and amc[15].answer == "-1"
    aime25, _ = read_records(DATA / "aime25.jsonl", "aime25")
    assert [r.id for r in aime25[:3]] == ["1", "2", "3"] and aime25[0].answer == "70"


def test_default_path_prefers_the_env_dir(tmp_path, monkeypatch):
    (tmp_path / "aime25.jsonl").write_text('{"problem": "p", "answer": "1"}\n')
    monkeypatch.setenv("TOPD_EVAL_DATA", str(tmp_path))
    assert default_path("aime25") == str(tmp_path / "aime25.jsonl")
    assert default_path("aime25", tmp_path / "elsewhere") is None
    with pytest.raises(ValueError, match="unknown math set layout 'mmlu'; known: aime24, aime25"):
        default_path("mmlu")
    with pytest.raises(ValueError, match="layout 'prompts' has no published file"):
        default_path("prompts")


def _one_row(tmp_path, row):
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps(row) + "\n")
    return path


@pytest.mark.parametrize("layout, row, expected", [
    ("aime24", {"id": 60, "problem": " P ", "answer": "204", "url": "u"}, ("60", "P", "204")),
    ("aime25", {"problem": "P", "answer": "70"}, ("1", "P", "70")),
    ("amc23", {"id": 0, "problem": "P", "answer": 27.0}, ("0", "P", "27")),
    ("amc23", {"id": 1, "problem": "P", "answer": 2.5}, ("1", "P", "2.5")),
    ("math500", {"problem": MATH500_INSTRUCTION + " Convert $x$.", "answer": "3", "unique_id": "test/a/1.json"},
     ("test/a/1.json", "Convert $x$.", "3")),
    ("gsm8k", {"question": "Q", "answer": "3 + 4 = <<3+4=7>>7\n#### 7", "idx": 5}, ("5", "Q", "7")),
    ("gsm8k", {"question": "Q", "answer": "#### 2\n#### 1,600", "idx": 6}, ("6", "Q", "1600")),
    ("aime24", {"problem": "P", "answer": 204}, ("1", "P", "204")),  # No id: the line number.
    ("prompts", {"problem": "P", "answer": "1", "id": "k"}, ("1", "P", "1")),  # id_field defaults to None.
])
def test_layout_maps_its_published_fields(tmp_path, layout, row, expected):
    records, skipped = read_records(_one_row(tmp_path, row), layout)
    assert records == [MathRecord(*expected)] and not skipped


def test_prompts_layout_uses_given_fields_and_counts_into_the_given_counter(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"q": "P", "a": "1", "key": "k"}) + "\n" + json.dumps({"q": "R", "a": "2"}) + "\n"
                    + json.dumps({"problem": "S", "answer": "3"}) + "\n")
    skipped = Counter({"earlier": 1})
    records = list(iter_records(path, "prompts", skipped=skipped, problem_field="q", answer_field="a",
                                id_field="key", line_prefix="p.jsonl:"))
    assert records == [MathRecord("k", "P", "1"), MathRecord("p.jsonl:2", "R", "2")]
    assert skipped == {"earlier": 1, "missing field 'q'": 1}


def test_bad_records_are_skipped_and_counted_by_reason(tmp_path):
    good = {"id": 7, "problem": "What is 1+1?", "answer": 2.0}
    lines = [json.dumps(good).encode(),
             b'{"id": 8, "problem": "caf\xe9", "answer": "1"}',       # Latin-1 byte: not UTF-8
             b'{"id": 9, "problem": ',                                # truncated: not JSON
             b'[1, 2]',                                               # JSON, not an object
             json.dumps({"id": 10, "answer": "3"}).encode(),          # no problem
             json.dumps({"id": 11, "problem": "q", "answer": None}).encode(),
             json.dumps({"id": 12, "problem": "   ", "answer": "3"}).encode(),
             json.dumps({"id": 13, "problem": "q", "answer": ""}).encode(),
             json.dumps({"id": 14, "problem": "q", "answer": [1]}).encode(),
             b"",                                                      # blank: not a record
             json.dumps({"problem": "no id", "answer": "4"}).encode()]
    path = tmp_path / "amc.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    records, skipped = read_records(path, "amc23")
    assert records == [MathRecord("7", "What is 1+1?", "2"), MathRecord("11", "no id", "4")]
    assert skipped == {"not valid UTF-8": 1, "not JSON": 1, "not a JSON object": 1, "missing field 'problem'": 1,
                       "missing field 'answer'": 1, "empty problem": 1, "empty answer": 2}


def test_gsm8k_without_hashes_is_skipped_and_thousands_lose_commas(tmp_path):
    path = tmp_path / "gsm.jsonl"
    rows = [{"idx": 0, "question": "q", "answer": "so 1,450,000\n#### 1,450,000"},
            {"idx": 1, "question": "q", "answer": "no final line"},
            {"idx": 2, "question": "q", "answer": "#### 3.5"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records, skipped = read_records(path, "gsm8k")
    assert [(r.id, r.answer) for r in records] == [("0", "1450000"), ("2", "3.5")]
    assert skipped == {"no #### answer": 1}


def test_parquet_rows_read_like_jsonl(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.table({"problem": ["Return your final response within \\boxed{}. Add 1 and 1.", ""],
                             "answer": ["2", "3"], "unique_id": ["a", "b"]}), tmp_path / "m.parquet")
    records, skipped = read_records(tmp_path / "m.parquet", "math500")
    assert records == [MathRecord("a", "Add 1 and 1.", "2")] and skipped == {"empty problem": 1}


def test_missing_file_and_unknown_layout_are_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"math set file .*absent.jsonl does not exist"):
        read_records(tmp_path / "absent.jsonl", "aime24")
    (tmp_path / "x.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match="unknown math set layout 'gsm8k_test'; known: aime24, aime25, amc23, "
                                         "math500, gsm8k, prompts"):
        read_records(tmp_path / "x.jsonl", "gsm8k_test")
