"""Task files: every format and field layout, and every bad input as one line naming the file, the line and the fix."""

import json

import pandas as pd
import pytest

from quant.data.tasks import TaskConfig, load_task, next_sentence_rows
from quant.errors import CalqError

GOOD = {"question": "q", "choices": ["a", "b"], "answer": 0}


def _cfg(path, kind="multiple_choice", **kw) -> TaskConfig:
    return TaskConfig(name="x", path=str(path), kind=kind, **kw)


def _jsonl(tmp_path, rows, blank_after_first=False) -> str:
    lines = [json.dumps(r) for r in rows]
    if blank_after_first:
        lines.insert(1, "")
    (tmp_path / "t.jsonl").write_text("\n".join(lines) + "\n")
    return str(tmp_path / "t.jsonl")


@pytest.mark.parametrize("rows,kind,fields,message", [
    ([{"question": "q", "choices": ["a", "b"]}] * 2, "multiple_choice", {},
     r"t.jsonl:1: no field 'answer' \(fields present: question, choices\); rename the column or set "
     r"evaluation.tasks\[x\].fields"),
    ([GOOD, {"question": "q2", "choices": ["a", "b"]}], "multiple_choice", {},
     r"t.jsonl:3: field 'answer' is missing or empty; fill it in or remove the item"),
    ([GOOD, {"question": "q2", "choices": ["a", "b"], "answer": 2}], "multiple_choice", {},
     r"t.jsonl:3: answer 2 is out of range for 2 choices; give a 0-based index 0..1"),
    ([dict(GOOD, answer="a"), {"question": "q2", "choices": ["a", "b"], "answer": "E"}], "multiple_choice", {},
     r"t.jsonl:3: answer letter 'E' is out of range for 2 choices; use A..B"),
    ([dict(GOOD, answer="a"), {"question": "q2", "choices": ["a", "b"], "answer": "cc"}], "multiple_choice", {},
     r"t.jsonl:3: answer 'cc' is not one of the choices"),
    ([GOOD, {"question": "q2", "choices": ["a"], "answer": 0}], "multiple_choice", {},
     r"t.jsonl:3: only 1 choice; multiple choice needs 2 or more"),
    ([dict(GOOD, id=7), dict(GOOD, id=7)], "multiple_choice", {"id": "id"},
     r"t.jsonl:3: duplicate id '7' \(first at .*t.jsonl:1\); give every item its own id"),
    ([GOOD, dict(GOOD, question="  ")], "multiple_choice", {}, r"t.jsonl:3: field 'question' is missing or empty"),
    ([{"q": "x", "answer": "y"}], "free_text", {}, r"t.jsonl:1: no field 'question' \(fields present: q, answer\)"),
    ([{"question": "x", "answer": []}], "free_text", {}, r"t.jsonl:1: no accepted answer in field 'answer'"),
])
def test_bad_items_are_one_line_naming_file_line_and_fix(tmp_path, rows, kind, fields, message):
    path = _jsonl(tmp_path, rows, blank_after_first=True)  # a blank line: line numbers are the file's own
    with pytest.raises(CalqError, match=message) as err:
        load_task(_cfg(path, kind, fields=fields))
    assert "\n" not in str(err.value)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(CalqError, match=r"task x: task file .*nope.jsonl does not exist; fix evaluation.tasks path"):
        load_task(_cfg(tmp_path / "nope.jsonl"))
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(CalqError, match=r"e.jsonl:1: the task file is empty; add one item per line"):
        load_task(_cfg(tmp_path / "e.jsonl"))
    (tmp_path / "t.txt").write_text("x")
    with pytest.raises(CalqError, match=r"is not a .jsonl/.json/.csv/.parquet file"):
        load_task(_cfg(tmp_path / "t.txt"))
    with pytest.raises(CalqError, match=r"unknown built-in task 'builtin:nope'; choose from builtin:wiki_next_sentence"):
        load_task(_cfg("builtin:nope"))


def test_csv_with_a_column_per_choice_and_letter_answers(tmp_path):
    pd.DataFrame({"Q": ["one", "two", "three", "four"], "A": ["x", "y", "z", "w"], "B": ["p", "q", "r", "s"],
                  "C": ["k", "l", "m", "n"], "gold": ["B", "C", "A", "B"]}).to_csv(tmp_path / "t.csv", index=False)
    task = load_task(_cfg(tmp_path / "t.csv", fields={"question": "Q", "choices": ["A", "B", "C"], "answer": "gold"},
                          max_items=2))
    everything = load_task(_cfg(tmp_path / "t.csv", fields={"question": "Q", "choices": ["A", "B", "C"],
                                                            "answer": "gold"}))
    assert [it.question for it in everything.items] == ["one", "two", "four"]  # row:2 -> fit split
    assert everything.held_out == 1 and everything.items[1].choices == ("y", "q", "l")
    assert [it.answer for it in everything.items] == [1, 2, 1]
    assert len(task.items) == 2 and task.dropped == 1
    assert everything.items[1].where.endswith("t.csv:3")  # header is line 1
    pd.DataFrame({"Q": ["one"], "A": ["x"], "B": ["p"], "C": ["k"], "gold": [3]}).to_csv(tmp_path / "b.csv",
                                                                                           index=False)
    with pytest.raises(CalqError, match=r"b.csv:2: answer 3 is out of range for 3 choices"):
        load_task(_cfg(tmp_path / "b.csv", fields={"question": "Q", "choices": ["A", "B", "C"], "answer": "gold"}))


def test_answers_of_mixed_types_and_an_unreadable_file(tmp_path):
    task = load_task(_cfg(_jsonl(tmp_path, [dict(GOOD, answer=1), dict(GOOD, answer="a"), dict(GOOD, answer="B")])))
    assert [it.answer for it in task.items] == [1, 0] and task.held_out == 1  # row:2 -> fit split
    # datasets reads mixed types through pandas, which a blank line stops: the error says what to look for
    with pytest.raises(CalqError, match=r"could not read .*t.jsonl as json: .*check for blank lines between items"):
        load_task(_cfg(_jsonl(tmp_path, [GOOD, dict(GOOD, answer="a")], blank_after_first=True)))


def test_json_and_parquet_name_rows(tmp_path):
    rows = [GOOD, {"question": "q2", "choices": ["a"], "answer": 0}]
    (tmp_path / "t.json").write_text(json.dumps(rows))
    with pytest.raises(CalqError, match=r"t.json row 1: only 1 choice"):
        load_task(_cfg(tmp_path / "t.json"))
    pd.DataFrame([{"question": "q", "answer": ["Paris", "paris"]}] * 3).to_parquet(tmp_path / "t.parquet")
    task = load_task(_cfg(tmp_path / "t.parquet", "free_text"))
    assert task.items[0].answers == ("Paris", "paris")


def test_shots_come_from_their_own_split_with_a_seed(tmp_path):
    rows = [dict(GOOD, question=f"t{i}", split="test") for i in range(6)] + \
           [dict(GOOD, question=f"d{i}", split="dev") for i in range(5)]
    path = _jsonl(tmp_path, rows)
    a = load_task(_cfg(path, fields={"split": "split"}, shots=3, seed=0))
    assert all(s.question.startswith("d") for s in a.shots) and len(a.shots) == 3
    assert all(it.question.startswith("t") for it in a.items)
    assert a.shots == load_task(_cfg(path, fields={"split": "split"}, shots=3, seed=0)).shots
    assert a.shots != load_task(_cfg(path, fields={"split": "split"}, shots=3, seed=3)).shots
    with pytest.raises(CalqError, match=r"6 shots asked for but only 5 rows have split == 'dev'"):
        load_task(_cfg(path, fields={"split": "split"}, shots=6))
    with pytest.raises(ValueError, match="shots need a split column"):
        _cfg(path, shots=1)


def test_the_builtin_tasks_load(tmp_path):
    facts = load_task(_cfg("builtin:facts", "free_text", fields={"id": "id"}))
    assert len(facts.items) >= 20 and all(it.answers for it in facts.items)
    rows = next_sentence_rows()
    assert rows == next_sentence_rows()  # deterministic
    assert len(rows) == 120 and all(len(r["choices"]) == 4 and 0 <= r["answer"] < 4 for r in rows)
    assert len({r["id"] for r in rows}) == len(rows)
    demo = load_task(_cfg("builtin:wiki_next_sentence", fields={"id": "id"}))
    assert len(demo.items) + demo.held_out == 120
