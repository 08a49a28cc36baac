"""The README's Python API example runs as written, on the real default model."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_example() -> str:
    section = README.read_text().split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_python_api_example_runs(capsys):
    exec(compile(python_example(), str(README), "exec"), {})
    out = capsys.readouterr().out
    assert out.startswith(("True {'layer': 30", "False {'layer': 30")), out[:200]  # 30 decoder layers
    assert "Answer(text=" in out
