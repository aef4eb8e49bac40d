"""The method protocol: generic code never branches on a concrete method class, and every MLLM method has every
face the export, parity, plan, inspect, bench and runtime code look up (a new method missing one fails here)."""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

import pytest

from tokensieve.methods import MLLM_METHODS, REGISTRY, VIT_METHODS
from tokensieve.methods.base import PrefillCuts
from tokensieve.methods.decoder import DecoderContext, DecoderMethod, PlanCost, PlanInput
from tokensieve.methods.faces import MissingFaceError, lookup
from tokensieve.methods.prompt_cache import PromptCacheCompression

PACKAGE = Path(__file__).resolve().parents[1] / "tokensieve"
CLASSES = {cls.__name__ for cls in REGISTRY.values()} | {"PrefillCuts", "PromptCacheCompression", "DecoderMethod"}
HEAVY = ("numpy", "torch", "onnx", "onnx_ir", "onnxruntime", "transformers", "timm")


def _names(node: ast.expr) -> set[str]:
    """Class names an ``isinstance`` second argument mentions (a name, an attribute, or a tuple of them)."""
    if isinstance(node, ast.Name):
        return {node.id}
    if isinstance(node, ast.Attribute):
        return {node.attr}
    if isinstance(node, ast.Tuple):
        return set().union(*(_names(e) for e in node.elts))
    return set()


def concrete_checks() -> list[str]:
    """``isinstance`` / ``issubclass`` calls against method classes outside ``tokensieve/methods``."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.parent.name == "methods":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            is_check = isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            checks = is_check and node.func.id in ("isinstance", "issubclass") and len(node.args) == 2
            if checks and _names(node.args[1]) & CLASSES:
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    return found


def test_no_concrete_method_checks_outside_methods():
    assert concrete_checks() == []


def test_methods_package_is_pure_python():
    for path in sorted((PACKAGE / "methods").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                modules = [node.module]
            for module in modules:
                assert module.split(".")[0] not in HEAVY, f"{path.name} imports {module}"
                if module.startswith("tokensieve"):
                    assert module == "tokensieve.errors" or module.startswith("tokensieve.methods"), path.name


def test_registry_is_discovered():
    assert {cls.name for cls in MLLM_METHODS} == {
        "fastv",
        "atp_llava",
        "dyvte",
        "mustdrop",
        "globalcom2",
        "streamingllm",
        "snapkv",
        "a2sf",
        "h2o",
        "razor",
        "keyformer",
        "pmod",
        "sparsevlm",
    }
    assert {cls.name for cls in VIT_METHODS} == {"topk", "tome", "pitome", "diffrate", "atp", "zerotprune"}


DECODER, IMAGE_TOKENS = {"layers": 32, "capacity": 4096}, {"count": 576, "per_crop": 576}


@pytest.mark.parametrize("cls", MLLM_METHODS, ids=lambda cls: cls.name)
def test_every_mllm_method_has_every_face(cls):
    from tokensieve.graph_passes import FACES as graph_faces
    from tokensieve.reference import FACES as reference_faces
    from tokensieve.runtimes import FACES as runtime_faces
    from tokensieve.runtimes.llava import Generation

    method = cls()
    assert issubclass(cls, DecoderMethod)
    assert list(inspect.signature(cls.validate).parameters) == ["self", "ctx"]
    assert graph_faces.has("export", cls), "the export rewrite (graph_passes)"
    assert reference_faces.has("reference", cls), "the eager reference (reference)"
    for face in ("decoder", "bench_decoder", "image_tokens"):
        assert runtime_faces.has(face, cls), f"the runtime's {face!r} (runtimes)"
    if cls.host_cuts:
        assert runtime_faces.has("prefill_cut", cls), "the host decision between prefill segments (runtimes)"
        assert graph_faces.has("prefill_scores", cls), "the scores each prefill segment outputs (graph_passes)"
    if issubclass(cls, PromptCacheCompression):
        assert graph_faces.has("cache_score", cls) and reference_faces.has("cache_score_reference", cls)
    fields = {f.name for f in dataclasses.fields(Generation)}
    assert set(cls.kept_fields) <= fields, "parity reads the kept positions from Generation's fields"
    explanation = method.explain(DECODER, IMAGE_TOKENS)
    assert isinstance(explanation, str) and explanation, "inspect's explanation"
    cost = method.plan(PlanInput(32, 32, 128, 576, 636, 64, 4096))
    assert cls.data_dependent == (cost is None), "plan: a cost unless the counts depend on the data"
    if cost is not None:
        assert isinstance(cost, PlanCost) and len(cost.tokens) == len(cost.cached) == 32


@pytest.mark.parametrize("cls", VIT_METHODS, ids=lambda cls: cls.name)
def test_every_vit_method_has_its_faces(cls):
    from tokensieve.graph_passes import FACES as graph_faces
    from tokensieve.reference import FACES as reference_faces

    assert reference_faces.has("site_reference", cls)
    assert graph_faces.has("site_emitter", cls) or getattr(cls, "adaptive", False)  # ATP: staged export


def test_a_method_missing_a_face_fails_loudly():
    @dataclasses.dataclass(frozen=True)
    class Unfinished(DecoderMethod):
        name = "unfinished"

    from tokensieve.graph_passes import FACES as graph_faces

    with pytest.raises(MissingFaceError, match="Unfinished has no 'export' face"):
        graph_faces.lookup("export", Unfinished())
    assert lookup("export", Unfinished(), None) is None


def test_one_validate_signature_with_the_old_messages():
    from tokensieve.errors import MethodSpecError
    from tokensieve.methods import parse_methods

    ctx = DecoderContext(
        layers=4, kind="llava_next", select_strategy="default", image_tokens=0, capacity=64, layout="anyres"
    )
    cases = {
        "fastv(k=4)": "k=4 is out of range; this decoder has 4 layers",
        "atp_llava(layers=[2])": "LLaVA-NeXT packs a thumbnail and crops",
        "dyvte(layers=[4])": "layer 4 is out of range; this decoder has 4 layers",
        "streamingllm(sink=63)": "leaves no recent window in a 64-slot cache",
        "snapkv(budget=64, window=4)": "leaves no cache slot for new tokens in a 64-slot decode graph",
    }
    for text, message in cases.items():
        with pytest.raises(MethodSpecError, match=message):
            parse_methods(text)[0].validate(ctx)
    with pytest.raises(MethodSpecError, match="plain LLaVA"):
        parse_methods("globalcom2")[0].validate(dataclasses.replace(ctx, kind="llava", layout="grid"))
    assert issubclass(PrefillCuts, DecoderMethod)
