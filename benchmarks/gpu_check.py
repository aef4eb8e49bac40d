"""The prepared run for a lent GPU machine: eager-on-CUDA vs exported parity, TensorRT engines and their latency.

    python benchmarks/gpu_check.py --out OUT_DIR [--model timm:vit_base_patch16_224] [--device cuda]

Sections; each records what it ran, and what it could not run and why, then goes on:

1. environment: torch and its CUDA device, ONNX Runtime providers, TensorRT, Polygraphy;
2. export ``--model`` with ``topk(keep=0.7, layers=[3, 6, 9])`` (dynamic batch) and hold the graph on ONNX Runtime
   CPU to the eager reference on ``--device`` (values and kept tokens per site); golden files written;
3. ONNX Runtime's CUDA provider, when it is there: the same parity with the graph on the GPU;
4. TensorRT, when it imports: engines (FP32 and FP16), the golden replay on each engine, latency of the pruned and
   the unpruned engine at batch 1 and 8 against the MAC-limit speedup;
5. an INT8 (QDQ) copy of the pruned artifact: its ONNX Runtime drift, engines built with the INT8 flag, the golden
   replay on the engine within the drift budget, and latency;
6. a bucketed ATP artifact of the same model on TensorRT: its recorded parity replayed on the engines (every
   bucket edge and routing mode), the dispatcher on the engines against ONNX Runtime (routes, outputs), and
   bucketed vs dynamic-shape engine vs pad-to-max vs unreduced latency;
7. what a GPU can confirm of the deployment fixes (docs/deploy.md): Polygraphy's version against the 0.50.3 floor,
   ``tf32`` recorded in build.json, the engine's input shape (-1) and profile batch the runner reads, 20 images
   through a max-batch-8 engine in chunks equal to one-by-one runs (no reused host buffer leaks between chunks), and
   the ``polygraphy run`` replay command the parity report prints, run as printed.

Writes OUT_DIR/gpu_check.json (and prints it). On a CPU machine sections 3-6 report why they did not run, which
is how this script is checked here (``--device cpu``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import tokensieve
from tokensieve.bench.image import bench_staged
from tokensieve.runtimes.tensorrt import tensorrt_version


def section(results: dict[str, Any], name: str):
    """``section(results, name)(fn)`` runs one section and stores its dict (or the error that stopped it) under
    ``name``."""

    def run(fn):
        try:
            results[name] = fn()
        except Exception as e:  # a check script reports and goes on
            results[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc(limit=3)}
        print(f"== {name}: {json.dumps(results[name], default=str)[:600]}", flush=True)
        return fn

    return run


@dataclass
class Context:
    """What the sections share: the command line, the output folder and the artifacts exported so far."""

    model: str
    device: str
    out: Path
    trt: bool
    artifacts: dict[str, Any] = field(default_factory=dict)


def check_environment(ctx: Context) -> dict[str, Any]:
    import onnxruntime as ort
    import torch

    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_device": torch.cuda.get_device_name(0) if cuda else None,
        "onnxruntime": ort.__version__,
        "ort_providers": ort.get_available_providers(),
        "tensorrt": ".".join(map(str, tensorrt_version())) if ctx.trt else None,
        "polygraphy": importlib.util.find_spec("polygraphy") is not None,
    }


def check_parity_eager_on_device(ctx: Context) -> dict[str, Any]:
    artifact = tokensieve.export(ctx.model, "topk(keep=0.7, layers=[3, 6, 9])", ctx.out / "topk", dynamic_batch=True)
    ctx.artifacts["topk"] = artifact
    report = artifact.parity(batch=4, device=ctx.device)
    return {"ok": report.ok, "text": report.text()}


def check_parity_ort_cuda(ctx: Context) -> dict[str, Any]:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return {"skipped": "onnxruntime has no CUDAExecutionProvider (onnxruntime-gpu is not installed)"}
    report = ctx.artifacts["topk"].parity(batch=4, providers=["CUDAExecutionProvider"], golden=False)
    return {"ok": report.ok, "provider": report.provider, "text": report.text()}


def check_tensorrt_engines(ctx: Context) -> dict[str, Any]:
    if not ctx.trt:
        return {"skipped": "TensorRT is not installed"}
    artifact, rows = ctx.artifacts["topk"], {}
    for precision in ("fp32", "fp16"):
        build = artifact.build(fp16=precision == "fp16", max_batch=8)
        replay = artifact.replay(runtime="tensorrt", tolerance=1e-3 if precision == "fp32" else 1e-2)
        bench = artifact.bench(batches=[1, 8], runtime="tensorrt", save=False)
        rows[precision] = {
            "build_seconds": {k: v["seconds"] for k, v in build["engines"].items()},
            "replay_ok": replay.ok,
            "replay": replay.text(),
            "bench": bench.to_dict(),
        }
    return rows


def check_tensorrt_int8(ctx: Context) -> dict[str, Any]:
    source = ctx.artifacts["topk"]
    data = np.random.default_rng(1).standard_normal((32, 3, 224, 224), dtype=np.float32)
    int8 = source.quantize(data, ctx.out / "topk_int8", tolerance=0.15, min_agreement=0.9)
    drift = int8.parity(batch=4, device=ctx.device)  # ONNX Runtime CPU INT8 vs the float32 eager reference
    if not ctx.trt:
        return {"ort_drift_ok": drift.ok, "ort_drift": drift.text(), "skipped": "TensorRT is not installed"}
    build = int8.build(max_batch=8)
    replay = int8.replay(runtime="tensorrt")  # the engine against the same golden files, within the budget
    bench = int8.bench(batches=[1, 8], runtime="tensorrt", save=False)
    return {
        "int8_flag": {k: v["int8_flag"] for k, v in build["engines"].items()},
        "ort_drift_ok": drift.ok,
        "ort_drift": drift.text(),
        "replay_ok": replay.ok,
        "replay": replay.text(),
        "bench": bench.to_dict(),
    }


def check_tensorrt_buckets(ctx: Context) -> dict[str, Any]:
    if not ctx.trt:
        return {"skipped": "TensorRT is not installed"}
    artifact = tokensieve.export(
        ctx.model, "atp(threshold=1.0)", ctx.out / "atp", dynamic_batch=True, buckets=[96, 128, 160, 196]
    )
    golden = artifact.parity(device=ctx.device)  # golden/staged.npz, then replayed on the engines
    artifact.build(max_batch=8)
    replay = artifact.replay(runtime="tensorrt", tolerance=1e-3)
    pixels = np.random.default_rng(0).standard_normal((8, 3, 224, 224), dtype=np.float32)
    engines, ort = artifact.staged_runner(runtime="tensorrt").run(pixels), artifact.staged_runner().run(pixels)
    name = next(iter(ort.outputs))
    scale = float(np.abs(np.asarray(ort.outputs[name])).max())
    error = float(np.abs(np.asarray(engines.outputs[name]) - np.asarray(ort.outputs[name])).max())
    bench = bench_staged(artifact, pixels, blocks=3, save=False, runtime="tensorrt")
    return {
        "parity_ok": golden.ok,
        "replay_on_engines_ok": replay.ok,
        "replay_on_engines": replay.text(),
        "same_routes": [r.buckets for r in engines.routes] == [r.buckets for r in ort.routes],
        "max_error_of_scale": error / scale,
        "bench": bench.to_dict(),
    }


def check_deploy_fixes(ctx: Context) -> dict[str, Any]:
    import subprocess

    import polygraphy

    found = {"polygraphy": polygraphy.__version__}
    if not ctx.trt:
        return {**found, "skipped": "TensorRT is not installed"}
    artifact = ctx.artifacts["topk"]
    build = artifact.build(max_batch=8)
    runner = artifact.runner("model", runtime="tensorrt")
    pixels = np.random.default_rng(2).standard_normal((20, 3, 224, 224), dtype=np.float32)
    chunked = runner.run({runner.input_names[0]: pixels})
    single = [runner.run({runner.input_names[0]: pixels[i : i + 1]}) for i in range(len(pixels))]
    name = next(iter(chunked))
    error = float(np.abs(chunked[name] - np.concatenate([s[name] for s in single])).max())
    report = artifact.parity(batch=2, device=ctx.device)
    replay = subprocess.run(report.replay.split(), capture_output=True, text=True)
    return {
        **found,
        "tf32_recorded": build.get("tf32"),
        "runner_batches": runner.batches,
        "chunked_vs_single_max_error": error,
        "replay_command": report.replay,
        "replay_rc": replay.returncode,
        "replay_tail": replay.stdout[-1500:] + replay.stderr[-1500:],
    }


SECTIONS = {
    "environment": check_environment,
    "parity_eager_on_device": check_parity_eager_on_device,
    "parity_ort_cuda": check_parity_ort_cuda,
    "tensorrt_engines": check_tensorrt_engines,
    "tensorrt_int8": check_tensorrt_int8,
    "tensorrt_buckets": check_tensorrt_buckets,
    "deploy_fixes": check_deploy_fixes,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="timm:vit_base_patch16_224")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"model": args.model, "device": args.device}
    ctx = Context(args.model, args.device, out, tensorrt_version() is not None)
    for name, check in SECTIONS.items():
        section(results, name)(lambda check=check: check(ctx))
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {out / 'gpu_check.json'}")


if __name__ == "__main__":
    main()
