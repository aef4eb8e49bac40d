"""Run what an image export wrote before it becomes an artifact: an artifact that cannot run, or whose eager
reference cannot run the model (so parity could never verify it), is refused with a typed error and nothing is
written.

* the reduced graph runs once on ONNX Runtime at its own input shapes (a static batch, or 2 images on a dynamic
  batch axis); a staged artifact runs every route: each bucket of the first site (the first site's count forced to
  the bucket's size), the symbolic-K chain and the pad-to-max graph;
* the eager reference (:class:`tokensieve.reference.reduce.ReducedModel`) is built with the methods and runs one
  forward pass, so a method the reference cannot apply to this model (e.g. merging before timm's parameter-free
  'prr' attention pool) fails at export rather than at ``parity``. Sources without an eager model (ONNX files) skip
  this half: their parity takes ``--reference``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tokensieve.errors import ExportError, first_line
from tokensieve.methods import Method, describe
from tokensieve.runtimes.buckets import StagedRunner, without_debug
from tokensieve.runtimes.ort import OrtRunner


def verify_export(
    staging: Path,
    model_file: str,
    stages: dict[str, Any] | None,
    methods: list[Method],
    specials: int | None,
    built: Any | None,
    batch: int | None,
    restore: bool = False,
) -> None:
    """Raise :class:`ExportError` unless the graphs in ``staging`` run and the eager reference runs the model."""
    runner = OrtRunner(staging / model_file)
    shape = runner.session.get_inputs()[0].shape
    if any(not isinstance(d, int) for d in shape[1:]):
        return  # symbolic image axes (an ONNX file's): no shape to run at; parity runs it at the reference's shape
    pixels = np.random.default_rng(0).standard_normal((batch or 2, *shape[1:])).astype(np.float32)
    what = describe(methods)
    try:
        if stages is None:
            runner.run({runner.input_names[0]: pixels})
        else:
            _run_routes(staging, stages, pixels)
    except Exception as e:  # the runners' typed errors and ONNX Runtime's own: the graph does not run
        raise ExportError(
            f"the exported graph with {what} does not run on ONNX Runtime ({first_line(e)}); nothing was written. The "
            "node named there is where the reduced token count meets a fixed shape: a head or output that needs "
            "every token (export the model without it, or with --method none)"
        ) from None
    if built is not None and methods:
        _run_reference(built, methods, specials, pixels[:1], what, restore)


def _run_routes(staging: Path, stages: dict[str, Any], pixels: np.ndarray) -> None:
    """Every bucket of the first site, the symbolic-K chain and the pad-to-max graph, on ``pixels``."""
    runner = StagedRunner(staging, stages, allow_truncation=True)
    state = runner.first_stage(pixels)
    for size in stages["buckets"][""]:
        forced = {**state, "count": np.full_like(state["count"], size)}
        runner.continue_from(forced)
    for mode in ("oracle", "padmax"):
        other = StagedRunner(staging, stages, mode=mode, allow_truncation=True)
        if mode == "padmax":
            other.run(pixels)
        else:
            other.continue_from(without_debug(dict(state)))


def _run_reference(
    built: Any, methods: list[Method], specials: int | None, pixels: np.ndarray, what: str, restore: bool
) -> None:
    import torch

    from tokensieve.reference.reduce import ReducedModel

    try:
        with torch.no_grad():
            ReducedModel(built.module, methods, specials, restore=restore)(torch.from_numpy(pixels))
    except Exception as e:  # whatever stops the reference stops parity
        raise ExportError(
            f"the eager reference cannot apply {what} to this model ({first_line(e)}), so parity could never verify "
            "the export; nothing was written"
        ) from None
