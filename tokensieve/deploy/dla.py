"""Which graphs of a Jetson bundle go on a DLA core, at which fixed shapes (docs/deploy.md#dla).

The DLA takes static shapes only (min = opt = max), FP16 or INT8 only, and runs convolution-like layers; what it
cannot run (``TopK``, ``Gather``, ``ScatterND``, matrix products of two activations, ...) falls back to the GPU
(``--allowGPUFallback``), so on a token-reduced ViT the DLA takes a share of each engine and the GPU the rest. A
graph qualifies when its only symbolic axis is the batch: it is built for the DLA at that batch fixed
(``dla_batch``). Graphs with other symbolic axes (a staged artifact's symbolic-K chain; MLLM sequences) stay on the
GPU with their optimization profile. The DLA exists on Orin with JetPack 6.x (TensorRT 10.3) and, from TensorRT
11.4.1, on AGX Orin with JetPack 7.2.2; Thor has none.

A DLA core holds at most 16 loadables at once, and the staged dispatcher (like a Triton repository) keeps every
engine it opened loaded: a bundle puts at most :data:`LOADABLES_PER_CORE` graphs on the core, in the order the
dispatcher needs them (stage 1, then the buckets), and leaves the rest on the GPU (``bundle.json``'s
``dla.over_limit``). One engine may hold more than one DLA loadable when GPU fallback splits it; ``check.sh``'s
trtexec run on the device is where that shows.
"""

from __future__ import annotations

from pathlib import Path

from tokensieve.errors import ArtifactError

DLA_JETPACKS = ("6.1", "6.2", "7.2.2")


def check_dla(artifact, jetpack: str, core: int, batch: int, fp16: bool, int8: bool) -> None:
    """Refuse a DLA request the device or the artifact cannot honour, saying what to do instead."""
    if jetpack not in DLA_JETPACKS:
        raise ArtifactError(
            f"JetPack {jetpack} has no DLA (Thor has none; DLA is on Orin with JetPack 6.1 / 6.2 and on AGX Orin from "
            "JetPack 7.2.2); leave out --dla or choose one of those JetPacks"
        )
    if artifact.kind == "mllm":
        raise ArtifactError("DLA engines are for image models; an MLLM's graphs have symbolic sequence axes")
    if core not in (0, 1) or batch < 1:
        raise ArtifactError(
            f"--dla takes a core index 0 or 1 (Orin has at most two DLA cores) and --dla-batch >= 1, got {core} and "
            f"{batch}"
        )
    if not (fp16 or int8):
        raise ArtifactError(
            "the DLA runs FP16 or INT8 only: give --fp16 (TensorRT 10 JetPacks) or an INT8 artifact from "
            "`tokensieve quantize`"
        )


def dla_job(job: dict, onnx: Path, core: int, batch: int) -> dict:
    """``job`` (onnx, plan, profile) for the DLA at ``batch`` when its graph's only symbolic axis is the batch;
    unchanged (GPU) otherwise."""
    import onnx_ir as ir

    fixed = {}
    for value in ir.load(onnx).graph.inputs:
        dims = [d if isinstance(d, int) else str(d) for d in value.shape]
        if any(isinstance(d, str) and d != "batch" for d in dims):
            return job
        if any(isinstance(d, str) for d in dims):
            shape = [batch if d == "batch" else d for d in dims]
            fixed[value.name] = [shape, shape, shape]
    return {**job, "profile": fixed, "dla_core": core}


LOADABLES_PER_CORE = 16


def limit_loadables(gpu_jobs: list[dict], dla_jobs: list[dict]) -> list[dict]:
    """``dla_jobs``, but with the DLA graphs past the first :data:`LOADABLES_PER_CORE` back on the GPU (their job in
    ``gpu_jobs``, marked ``dla_over_limit``)."""
    placed, on_core = [], 0
    for gpu, job in zip(gpu_jobs, dla_jobs, strict=True):
        if "dla_core" in job:
            on_core += 1
            if on_core > LOADABLES_PER_CORE:
                job = {**gpu, "dla_over_limit": True}
        placed.append(job)
    return placed
