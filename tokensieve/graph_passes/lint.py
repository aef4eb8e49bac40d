"""Graph pass (analysis only): TensorRT-compatibility lint, on CPU, without TensorRT installed.

Matches: every node and value of the main graph. Inserts nothing; ``LintPass(target)`` leaves the model unchanged
and stores a :class:`LintReport` on ``.report``.

Checks (errors unless noted), following docs/deploy.md#lint-rules and onnx-tensorrt ``docs/operators.md``:

* static shapes: every graph input, output and intermediate value has a fully known shape; a symbolic *batch*
  axis on inputs/outputs is a warning (it needs an optimization profile), any other symbolic axis is an error;
* ``TopK``: ``sorted=1``; ``K`` an initializer/``Constant`` or computed from ``Shape`` ops only (a shape tensor),
  never from data; a known ``K`` must be < 3840;
* ops TensorRT's parser rejects: ``Unique``, ``Compress``, sequence and optional ops; ``NonZero`` (data-dependent
  output shapes break Myelin fusion); ``Loop`` (dynamic scan outputs); ``If`` is a warning;
* ``ScatterElements`` / ``ScatterND`` with a ``reduction`` other than ``none``;
* ``CumSum`` axis and ``OneHot`` depth must be constants;
* per-target caps: the default-domain opset and ops introduced after the target (``trt10.3`` = JetPack 6:
  opset <= 20, no ``Attention``, ``RMSNormalization``, ``RotaryEmbedding``, ``TensorScatter``); custom-domain
  ops other than TensorRT's own (``trt``) are errors;
* ``DOUBLE`` tensors are a warning (TensorRT has no FP64 compute).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import onnx_ir as ir

from tokensieve.errors import TokensieveError
from tokensieve.graph_passes.propagate import SHAPE_OPS

TOPK_MAX = 3840


@dataclass(frozen=True)
class Target:
    name: str
    max_opset: int
    unsupported: frozenset[str]
    description: str


_NEVER = frozenset(
    [
        "Unique",
        "Compress",
        "SequenceAt",
        "SequenceConstruct",
        "SequenceEmpty",
        "SequenceErase",
        "SequenceInsert",
        "SequenceLength",
        "SequenceMap",
        "SplitToSequence",
        "ConcatFromSequence",
        "Optional",
        "OptionalGetElement",
        "OptionalHasElement",
        "StringNormalizer",
        "TfIdfVectorizer",
    ]
)
TARGETS: dict[str, Target] = {
    "trt10.3": Target(
        "trt10.3",
        20,
        _NEVER | {"Attention", "RMSNormalization", "RotaryEmbedding", "TensorScatter"},
        "TensorRT 10.3 (JetPack 6.x on Orin)",
    ),
    "trt10": Target("trt10", 24, _NEVER, "TensorRT 10.16 (latest 10.x; JetPack 7.2)"),
    "trt11": Target("trt11", 24, _NEVER, "TensorRT 11.x (strongly typed)"),
}
_SHAPE_SOURCES = SHAPE_OPS | {"Constant", "ReduceMin", "ReduceMax"}  # ops a TensorRT shape tensor may come from


@dataclass(frozen=True)
class Finding:
    severity: str  # "error" | "warning"
    rule: str
    node: str
    op: str
    message: str

    def __str__(self) -> str:
        where = f"{self.node} ({self.op})" if self.node else "graph"
        return f"{self.severity}: [{self.rule}] {where}: {self.message}"


@dataclass
class LintReport:
    target: str
    findings: list[Finding] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict:
        return {
            "target": self.target,
            "ok": self.ok,
            "errors": [asdict(f) for f in self.errors],
            "warnings": [asdict(f) for f in self.warnings],
        }

    def text(self) -> str:
        head = (
            f"lint {self.target}: {'OK' if self.ok else 'FAILED'} "
            f"({len(self.errors)} errors, {len(self.warnings)} warnings)"
        )
        return "\n".join([head, *(f"  {f}" for f in self.findings)])


def _is_constant(value: ir.Value) -> bool:
    producer = value.producer()
    return value.const_value is not None or (producer is not None and producer.op_type == "Constant")


def _shape_derived(value: ir.Value) -> bool:
    """Computed from constants and ``Shape`` ops only (a TensorRT shape tensor)."""
    stack, seen = [value], set()
    while stack:
        v = stack.pop()
        if v in seen or _is_constant(v):
            continue
        seen.add(v)
        producer = v.producer()
        if producer is None or producer.op_type not in _SHAPE_SOURCES:
            return False
        if producer.op_type in ("Shape", "Size"):
            continue
        stack.extend(i for i in producer.inputs if i is not None)
    return True


def _symbols(text: str) -> set[str]:
    """The symbols of a dimension expression; ``min(...)``/``max(...)`` are functions (TensorRT's shape arithmetic
    has both), not symbols."""
    return set(re.findall(r"\b[A-Za-z_]\w*\b(?!\s*\()", text))


def _dims_problem(value: ir.Value, batch_symbols: set[str], io: bool) -> str | None:
    """Why ``value``'s shape is not static enough for TensorRT, or None.

    Graph inputs/outputs may be symbolic on axis 0 only (the batch, covered by an optimization profile);
    intermediate values may carry expressions of those batch symbols anywhere (``batch*12`` after a head merge).
    """
    if value.shape is None:
        return "unknown shape"
    for axis, d in enumerate(value.shape):
        if isinstance(d, int):
            continue
        if d.value is None:
            return f"unknown dimension at axis {axis}"
        if io and axis != 0:
            return f"symbolic dimension {d.value!r} at axis {axis}"
        if not _symbols(d.value) <= batch_symbols:
            return f"symbolic dimension {d.value!r} at axis {axis} does not derive from the batch axis"
    return None


class Linter:
    def __init__(self, model: ir.Model, target: Target, profiles: bool = False):
        self.model, self.target, self.profiles = model, target, profiles
        self.report = LintReport(target.name)
        self.batch_symbols: set[str] = set()

    def add(self, severity: str, rule: str, node: ir.Node | None, message: str) -> None:
        name = (node.name or "") if node is not None else ""
        op = node.op_type if node is not None else ""
        self.report.findings.append(Finding(severity, rule, name, op, message))

    def run(self) -> LintReport:
        opset = self.model.opset_imports.get("", 0)
        if opset > self.target.max_opset:
            self.add(
                "error",
                "opset",
                None,
                f"opset {opset} > {self.target.max_opset} supported by {self.target.description}; "
                f"export with --opset {self.target.max_opset}",
            )
        self.io_shapes()
        for node in self.model.graph:
            self.node(node)
        return self.report

    def io_shapes(self) -> None:
        for value in self.model.graph.inputs:
            for axis, d in enumerate(value.shape or []):
                if not isinstance(d, int) and (axis == 0 or self.profiles):
                    self.batch_symbols |= _symbols(d.value or "")
        for kind, values in (("input", self.model.graph.inputs), ("output", self.model.graph.outputs)):
            for value in values:
                problem = _dims_problem(value, self.batch_symbols, io=not self.profiles)
                if problem is not None:
                    self.add("error", "static-shape", None, f"graph {kind} {value.name!r}: {problem}")
                elif any(not isinstance(d, int) for d in value.shape):
                    self.add(
                        "warning",
                        "dynamic-shape" if self.profiles else "dynamic-batch",
                        None,
                        f"graph {kind} {value.name!r} has symbolic axes ({value.shape}); the engine needs an "
                        "optimization profile (min/opt/max)",
                    )

    def node(self, node: ir.Node) -> None:
        op, domain = node.op_type, node.domain or ""
        if domain not in ("", "ai.onnx"):
            if domain != "trt":
                self.add("error", "custom-op", node, f"custom-domain op {domain}::{op} is not parsed by TensorRT")
            return
        if op in self.target.unsupported:
            self.add("error", "unsupported-op", node, f"{op} is not supported by {self.target.description}")
        elif op == "NonZero":
            self.add(
                "error",
                "data-dependent-shape",
                node,
                "NonZero has a data-dependent output shape; use a fixed-K TopK + validity mask instead",
            )
        elif op == "Loop":
            self.add(
                "error",
                "loop",
                node,
                "Loop is not allowed: unroll it (scan outputs cannot have dynamic length)",
            )
        elif op == "If":
            self.add("warning", "if", node, "If needs branches with equal output ranks in TensorRT")
        elif op == "TopK":
            self.topk(node)
        elif op in ("ScatterElements", "ScatterND"):
            reduction = node.attributes.get_string("reduction", "none")
            if reduction != "none":
                self.add(
                    "error",
                    "scatter-reduction",
                    node,
                    f"{op} with reduction={reduction!r}; use a one-hot MatMul merge instead",
                )
        elif op == "CumSum" and not _is_constant(node.inputs[1]):
            self.add("error", "cumsum-axis", node, "CumSum axis must be a constant")
        elif op == "OneHot" and not _is_constant(node.inputs[1]):
            self.add("error", "onehot-depth", node, "OneHot depth must be a constant")
        for value in node.outputs:
            problem = _dims_problem(value, self.batch_symbols, io=False)
            if problem is not None:
                self.add("error", "static-shape", node, f"output {value.name!r}: {problem}")
            if value.dtype == ir.DataType.DOUBLE:
                self.add("warning", "fp64", node, f"output {value.name!r} is DOUBLE; TensorRT computes in FP32")

    def topk(self, node: ir.Node) -> None:
        if node.attributes.get_int("sorted", 1) != 1:
            self.add("error", "topk-sorted", node, "TopK must have sorted=1 in TensorRT")
        k = node.inputs[1]
        tensor = ir.convenience.get_const_tensor(k)
        if tensor is not None:
            value = int(tensor.numpy().reshape(-1)[0])
            if value >= TOPK_MAX:
                self.add("error", "topk-k", node, f"K={value} >= {TOPK_MAX}; use a two-stage TopK or a plugin")
        elif not _shape_derived(k):
            self.add(
                "error",
                "topk-k",
                node,
                "K is computed from data; TensorRT needs a constant or shape-derived K (use buckets)",
            )


class LintPass(ir.passes.PassBase):
    """TensorRT lint as an analysis pass: changes nothing, stores ``.report``."""

    def __init__(self, target: str = "trt10.3", profiles: bool = False):
        super().__init__()
        self.profiles = profiles
        if target not in TARGETS:
            raise TokensieveError(f"unknown lint target {target!r}; choose one of {', '.join(TARGETS)}")
        self.target = TARGETS[target]
        self.report: LintReport | None = None

    @property
    def in_place(self) -> bool:
        return True

    @property
    def changes_input(self) -> bool:
        return False

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.report = Linter(model, self.target, self.profiles).run()
        return ir.passes.PassResult(model, modified=False)


def lint(model: ir.Model, target: str = "trt10.3", profiles: bool = False) -> LintReport:
    """``profiles``: symbolic axes of the graph inputs (and expressions of them) are allowed, as warnings, for a
    graph built with one optimization profile per shape (e.g. a symbolic-K stage); otherwise only the batch axis."""
    lint_pass = LintPass(target, profiles)
    lint_pass(model)
    assert lint_pass.report is not None
    return lint_pass.report
