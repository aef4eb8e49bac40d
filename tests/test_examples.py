"""The walk-throughs in examples/ run as written (MLLM: export, inspect, generate, parity; deployment: buckets,
parity, Triton repository, Jetson bundle)."""

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


def test_deploy_buckets_example(tmp_path):
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "deploy_buckets.py"), str(tmp_path / "deploy")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "deploy OK" in done.stdout and "Triton: clients call 'vit_atp'" in done.stdout
    assert (tmp_path / "deploy" / "triton_repo" / "vit_atp" / "1" / "model.py").is_file()
    assert (tmp_path / "deploy" / "vit_atp_jp62.tar.gz").is_file()
