"""Shared fixtures: each model is built and exported once per test session, then reused by many parity cases.

``zoo(source, ...)`` returns ``(path to the exported unreduced .onnx, BuiltModel)``; tests turn that file into
artifacts with the public API (``tokensieve.export(path, method, out)``, i.e. the "existing ONNX file" source) and
check them with ``artifact.parity(reference=built)``. Keeping exports cached keeps the suite well inside its time
budget while every case still runs the real pass, checker, lint and ONNX Runtime.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import onnx_ir as ir
import pytest
import torch
from helpers import HF_TINY

from tokensieve.converters.export import export_onnx
from tokensieve.converters.sources import build_module, parse_source

logging.getLogger("onnxscript").setLevel(logging.ERROR)


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
