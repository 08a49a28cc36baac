"""The GPU check is run where a GPU is lent, with minutes to spare: its glue is checked here on CPU first."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_runs_end_to_end_in_its_cpu_smoke_mode(tmp_path):
    out = tmp_path / "out"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--quick", "--out", str(out),
                    "--work", str(tmp_path / "work")], check=True, capture_output=True, text=True)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["correctness"]["checked"] > 0 and summary["correctness"]["failed"] == 0
    assert [t["target"] for t in summary["targets"]][0] == "W4A16 vs cuBLAS bf16 at M=1"
    stages = summary["pipeline"]["tiny-llama"]
    assert {f"quantize {n}" for n in ("w4-minmax", "w8a8", "fp8", "w4-awq", "w4-gptq")} <= stages.keys()
    assert "streamed: stats + all variants" in stages
    decode = (out / "decode.csv").read_text().splitlines()
    assert [row.split(",")[1] for row in decode[1:]] == ["bf16", "W4A16_ASYM", "W8A8", "FP8_DYNAMIC"]
