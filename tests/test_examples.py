"""The walk-throughs in examples/ run as written (MLLM: export, inspect, generate, parity; deployment: buckets,
parity, Triton repository, Jetson bundle)."""

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(script: str, out: Path) -> str:
    """Run one example with ``out`` as its output folder; its stdout."""
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script), str(out)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_generate_llava_example(tmp_path):
    stdout = _run("generate_llava.py", tmp_path / "next")
    assert "parity OK" in stdout
    assert "image tokens at [" in stdout


def test_deploy_buckets_example(tmp_path):
    stdout = _run("deploy_buckets.py", tmp_path / "deploy")
    assert "deploy OK" in stdout and "Triton: clients call 'vit_atp'" in stdout
    assert (tmp_path / "deploy" / "triton_repo" / "vit_atp" / "1" / "model.py").is_file()
    assert (tmp_path / "deploy" / "vit_atp_jp62.tar.gz").is_file()
