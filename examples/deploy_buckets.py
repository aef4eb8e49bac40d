"""Deployment walk-through: adaptive (ATP-style) pruning with calibrated static-shape buckets, checked against the
eager reference, then packed for serving: a Triton model repository (one model per bucket plus a router) and a
Jetson bundle (the artifact plus trtexec scripts for JetPack 6.2's TensorRT 10.3).

    python examples/deploy_buckets.py [OUT_DIR]
"""

import sys
from pathlib import Path

import tokensieve
from tokensieve.calibration.data import sample_images

out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/deploy")
calibration = out / "calibration"  # stand-in for a folder of your own images
calibration.mkdir(parents=True, exist_ok=True)
for i, image in enumerate(sample_images(24, seed=11)):
    image.save(calibration / f"image{i:02d}.jpg")

artifact = tokensieve.export(
    "timm:vit_small_patch16_224",  # random weights (no hub); weights="ckpt.pth" for a real checkpoint
    "atp()",
    out / "vit_atp",
    buckets="auto",  # at most 6 bucket edges chosen by an exact DP over the calibration counts
    calibrate=calibration,
    target_keep=0.5,  # threshold calibrated to keep half the patch tokens on average
    dynamic_batch=True,
)
stages = artifact.manifest.stages
print("buckets:", stages["buckets"][""], "threshold:", round(stages["calibration"]["threshold"], 4))

report = artifact.parity(batch=2)  # every bucket at its edge counts, the oracle and pad-to-max graphs
print(report.text().splitlines()[0])
print(artifact.lint("trt10.3").text().splitlines()[0])

models = artifact.triton(out / "triton_repo", max_batch=8)
print(f"Triton: clients call {models[0]!r}; {len(models) - 1} stage models in {out / 'triton_repo'}")

bundle = artifact.jetson(out / "vit_atp_jp62.tar.gz", jetpack="6.2", fp16=True)
print(f"Jetson: {len(bundle['graphs'])} graphs for TensorRT {bundle['tensorrt']} in {out / 'vit_atp_jp62.tar.gz'}")
print("deploy OK" if report.ok else "parity FAILED")
