"""The MLLM walk-through in examples/ runs as written (export, inspect, generate with both caches, parity)."""

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_generate_llava_example(tmp_path):
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "generate_llava.py"), str(tmp_path / "next")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "parity OK" in done.stdout
    assert "image tokens at [" in done.stdout
