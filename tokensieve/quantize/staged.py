"""INT8 calibration feeds for every graph of a staged (bucketed) artifact, and its manifest after quantization.

Each stage graph is quantized on its own inputs: stage 1 on the calibration images; a bucket's stage graph on the
outputs of the stage before it for **every** calibration image, with the bucket's validity mask (an image whose
count exceeds the bucket fills it, as truncation would), so every bucket graph gets calibration data however the
images route, and at several sites the walk goes down every route. The symbolic-K chain (the oracle and the
one-engine-with-profiles source) is fed the same tensors at every bucket size. The float32 graphs produce the
feeds, so each INT8 graph is calibrated on what its float32 original sees.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tokensieve.runtimes.buckets import bucket_feeds, without_debug
from tokensieve.runtimes.ort import OrtRunner


def stage_feeds(artifact, images: list[dict[str, np.ndarray]]) -> dict[str, list[dict[str, np.ndarray]]]:
    """Relative graph path -> calibration feeds, for stage 1 and every bucket and symbolic-K stage graph."""
    stages = artifact.manifest.stages
    first = stages["graphs"][""]
    feeds: dict[str, list[dict[str, np.ndarray]]] = {first: images}
    runner = OrtRunner(artifact.path / first)
    states = [without_debug(runner.run(batch)) for batch in images]

    def walk(route: str, states: list[dict[str, np.ndarray]], table: str) -> None:
        for size in stages["buckets"][route]:
            child = f"{route}/{size}" if route else str(size)
            graph = stages[table][child if table == "graphs" else "/".join("*" for _ in child.split("/"))]
            batches = [bucket_feeds(state, size) for state in states]
            feeds.setdefault(graph, []).extend(batches)
            if child in stages["buckets"]:  # a later site: continue down this route from this graph's outputs
                later = OrtRunner(artifact.path / graph)
                walk(child, [without_debug(later.run(batch)) for batch in batches], table)

    walk("", states, "graphs")
    walk("", states, "dynamic")
    return feeds


def restage(stages: dict, directory: Path, target: str) -> None:
    """After quantization: every stage graph's lint (``graph_info``) and the trtexec recipes with INT8."""
    import onnx_ir as ir

    from tokensieve.exporter.staged import write_recipes
    from tokensieve.graph_passes.lint import lint

    dynamic = set(stages["dynamic"].values()) - set(stages["graphs"].values())
    for path, info in stages["graph_info"].items():
        info["lint"] = lint(ir.load(directory / path), target, profiles=path in dynamic).to_dict()
    write_recipes(directory, stages, int8=True)
