"""Python API walk-through: export a pruned ViT, inspect it, check parity, run it, lint it, time it."""

import numpy as np

import tokensieve
from tokensieve.inspect.image import format_inspection

artifact = tokensieve.export(
    "timm:vit_small_patch16_224",  # random weights (no hub); pass weights="ckpt.pth" for a real checkpoint
    "topk(keep=0.7, layers=[3,6,9])",
    "runs/vit_small_topk",
)
print(format_inspection(artifact.inspect()))

report = artifact.parity()  # eager PyTorch reference vs ONNX Runtime: values and kept tokens per site
print(report.text())

logits = artifact.run(np.random.default_rng(0).standard_normal((1, 3, 224, 224), dtype=np.float32))["logits"]
print("top-5 classes:", np.argsort(-logits[0])[:5])

print(artifact.lint("trt10.3").text())
print(artifact.bench(batches=[1]).text())
