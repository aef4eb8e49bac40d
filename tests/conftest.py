"""Shared fixtures: each model is built and exported once per test session, then reused by many parity cases.

``zoo(source, ...)`` returns ``(path to the exported unreduced .onnx, BuiltModel)``; tests turn that file into
artifacts with the public API (``tokensieve.export(path, method, out)``, i.e. the "existing ONNX file" source) and
check them with ``artifact.parity(reference=built)``. Keeping exports cached keeps the suite well inside its time
budget while every case still runs the real pass, checker, lint and ONNX Runtime.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import onnx_ir as ir
import pytest
import torch
from helpers import HF_TINY

import tokensieve.converters.export
from tokensieve.converters.export import export_onnx
from tokensieve.converters.sources import build_module, parse_source

logging.getLogger("onnxscript").setLevel(logging.ERROR)


def _export_key(module, args, input_names, output_names, opset=18, dynamic_axes=None, exporter="dynamo") -> tuple:
    """What determines the graph ``export_graph`` returns: the module's class, its submodules' plain attributes, the
    model configs and weights, the example inputs' shapes and dtypes (not their random values), the names, opset,
    axes and exporter."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    settings = [  # plain attributes of every submodule (timm's fused_attn, a wrapper's options)
        (path, sorted((k, repr(v)) for k, v in vars(m).items() if not k.startswith("_") and k != "training"))
        for path, m in module.named_modules()
    ]
    configs = [
        (repr(m.config), getattr(m.config, "_attn_implementation", None))
        for m in module.modules()
        if hasattr(m, "config")
    ]
    shapes = [(tuple(t.shape), str(t.dtype)) for t in torch.utils._pytree.tree_leaves(args)]
    axes = repr(sorted((dynamic_axes or {}).items()))
    key = (type(module).__qualname__, digest.hexdigest(), repr(settings), repr(configs), repr(shapes))
    return (*key, tuple(input_names), tuple(output_names), opset, axes, exporter)


@pytest.fixture(scope="session", autouse=True)
def reuse_exports():
    """Run the torch exporter once per distinct module and example shapes in a test session (per xdist worker).

    Many tests export the same small model (every MLLM method test starts from ``hf:llava-tiny``'s five graphs,
    and most share the vision, embed, prefill and growing-decode graphs): ``export_graph`` then returns a clone of
    the graph exported first. Everything after the exporter (shape propagation is part of it; the graph passes,
    saving, lint, ONNX Runtime and parity) still runs on every artifact. Exporter failures are not cached."""
    export_graph = tokensieve.converters.export.export_graph
    graphs: dict[tuple, ir.Model] = {}

    def cached(module, args, *rest, **kwargs):
        key = _export_key(module, args, *rest, **kwargs)
        if key not in graphs:
            graphs[key] = export_graph(module, args, *rest, **kwargs)
        return graphs[key].clone()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tokensieve.converters.export, "export_graph", cached)
        yield


@pytest.fixture(scope="session")
def hf_config_dir(tmp_path_factory):
    """Write a tiny HF config to ``<dir>/<name>/config.json`` and return the directory (an ``hf:PATH`` source)."""
    root = tmp_path_factory.mktemp("hf_configs")

    def make(name: str) -> Path:
        directory = root / name
        if not directory.exists():
            directory.mkdir()
            (directory / "config.json").write_text(json.dumps(HF_TINY[name]))
        return directory

    return make


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    cache: dict = {}
    built_cache: dict = {}

    def get(
        source: str,
        *,
        exporter: str = "dynamo",
        opset: int = 18,
        batch: int = 1,
        dynamic_batch: bool = False,
        img_size: int | None = None,
    ):
        key = (source, exporter, opset, batch, dynamic_batch, img_size)
        if key not in cache:
            spec = parse_source(source, img_size=img_size)
            if (source, img_size) not in built_cache:
                built_cache[(source, img_size)] = build_module(spec)
            built = built_cache[(source, img_size)]
            example = torch.randn(max(batch, 2) if dynamic_batch else batch, *built.input_shape)
            model = export_onnx(
                built.module,
                example,
                built.output_names,
                opset=opset,
                dynamic_batch=dynamic_batch,
                exporter=exporter,
            )
            directory = tmp_path_factory.mktemp("zoo")
            path = directory / "model.onnx"
            ir.save(model, path, external_data="weights.data")
            cache[key] = (path, built)
        return cache[key]

    return get
