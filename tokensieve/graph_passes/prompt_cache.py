"""Graph pass: prompt-cache compression (SnapKV, A2SF, H2O) at the end of an MLLM **prefill** graph.

Matches: the decoder layers of a prefill graph (:func:`tokensieve.graph_passes.locate_decoder.locate_decoder`, cache
form ``none``): per layer the attention ``Softmax``, the operands of its logits ``MatMul`` (Q and Kᵀ after RoPE and
scaling, GQA-expanded) and the ``present_key_<i>`` / ``present_value_<i>`` outputs ``[1, H_kv, T, d]``.

Inserts, per layer (the layer's own computation is untouched, so the prompt's logits do not change), a score
``[1, H_kv, T]`` (the method's scoring step) and the shared selection step:

* SnapKV score: ``Slice`` of the last ``window`` query rows, ``MatMul`` with Kᵀ, a causal mask inside the window
  (``Where`` on ``Range`` comparisons), ``Softmax``, ``ReduceSum`` over the rows, the window's own columns zeroed,
  mean over each KV group's query heads, then ``AveragePool`` (``count_include_pad=1``) or ``MaxPool`` of width
  ``kernel`` over positions (on ``[1, H_kv, 1, T]``, a 2-D pool of height 1, which TensorRT supports);
* A2SF score: the layer's own attention probabilities ``[1, H, T, T]`` weighted per query row by
  ``forgetting_factor ** (T - 1 - q)`` (``Pow`` of a ``Range``) and summed over the rows with one ``MatMul``, then
  summed over each KV group's query heads;
* Keyformer score: ``tokensieve.graph_passes.keyformer`` (its ``"cache_score"``);
* selection: the last ``protected`` positions (window / recent) get the largest finite priority, ``TopK`` with
  ``K = min(T, budget)`` (shape-derived; lower index first on ties; with a ``prompt_share``, Keyformer's budget,
  ``K = floor(T * share)`` and ``protected = floor(K * recent_share)``, integer ``Mul`` / ``Div`` of the shape),
  then ascending order (``TopK(largest=0)`` on the positions), ``GatherElements`` of the layer's keys and values
  along the sequence axis; they replace the ``present_*`` outputs (the full tensors stay internal, renamed
  ``*_full``);
* one graph output ``cache_positions [layers, H_kv, K]`` (int64): the positions every layer and KV head keeps;
  H2O (A2SF's score with its forgetting factor, 1 by default) also outputs their scores, ``cache_scores [layers,
  H_kv, K]``, the accumulated attention decoding goes on adding to.

Preconditions (``requires``): a prefill graph; every layer's ``present_*`` outputs found; the logits of each layer
are ``Q·Kᵀ`` (scaled operands) plus the causal mask. Postconditions (``ensures``): every ``present_*`` output has
the sequence dimension ``min(<sequence>,budget)`` (``floor(<sequence>*num/den)`` with a ``prompt_share``); every
new value has a shape.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import onnx_ir as ir

from tokensieve.errors import GraphRewriteError
from tokensieve.graph_passes import FACES, run_passes
from tokensieve.graph_passes.builder import NodeBuilder, record_site, typed
from tokensieve.graph_passes.locate_decoder import DecoderLayer, DecoderLayout, locate_decoder, logits_matmul
from tokensieve.methods.a2sf import A2SF
from tokensieve.methods.faces import register
from tokensieve.methods.prompt_cache import PromptCacheCompression
from tokensieve.methods.snapkv import SnapKV

POSITIONS = "cache_positions"
SCORES = "cache_scores"


def kept_dim(method: PromptCacheCompression, sequence: str) -> str:
    """The symbolic cache length after compression."""
    share = method.prompt_share
    if share is not None:
        return f"floor({sequence}*{share.numerator}/{share.denominator})"
    return f"min({sequence},{method.budget})"


def _floor_share(b: NodeBuilder, value: ir.Value, share: Fraction, name: str) -> ir.Value:
    """``floor(value * share)`` of a non-negative int64 ``[1]`` (exact: ``Mul`` by the numerator, ``Div``)."""
    scaled = typed(b.op("Mul", [value, b.const([share.numerator])]), [1], ir.DataType.INT64)
    return typed(b.op("Div", [scaled, b.const([share.denominator])], name), [1], ir.DataType.INT64)


class PromptCachePass(ir.passes.InPlacePass):
    """Compress every layer's prompt keys/values to ``method.budget`` positions (see module docstring)."""

    def __init__(self, method: SnapKV | A2SF):
        super().__init__()
        self.method = method
        self.layout: DecoderLayout | None = None
        self.graph: ir.Graph | None = None
        self.kept = ""

    def requires(self, model: ir.Model) -> None:
        self.layout = locate_decoder(model)
        if self.layout.cache != "none":
            raise GraphRewriteError(
                f"{self.method.name}: expected a prefill graph, got a decode graph ({self.layout.cache} cache)"
            )
        for layer in self.layout.layers:
            if len(layer.cache_outputs) != 2:
                raise GraphRewriteError(f"{self.method.name}: layer {layer.index} does not output its keys and values")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph, layout = model.graph, self.layout
        self.graph = graph
        first = layout.layers[0].cache_outputs[0]
        seq = first.shape[2]
        self.kept = kept_dim(self.method, str(seq))
        name = self.method.name
        b = NodeBuilder(model, f"tokensieve/{name}", {"tokensieve.method": name})
        shared = self._geometry(b, first, seq)
        positions, scores = zip(*(self._layer(b, layer, shared, seq) for layer in layout.layers), strict=True)
        outputs = [self._stack(b, positions, POSITIONS, ir.DataType.INT64)]
        if self.method.scores_output:  # the accumulated scores decoding goes on adding to
            outputs.append(self._stack(b, scores, SCORES, layout.layers[0].cache_outputs[0].dtype))
        graph.extend(b.nodes)
        graph.outputs.extend(outputs)
        exposed = dict(zip(("positions", "scores"), (v.name for v in outputs), strict=False))
        record_site(model, {"method": name, "layers": "all", "exposed": exposed})
        return ir.passes.PassResult(model, modified=True)

    def _stack(self, b: NodeBuilder, parts: tuple[ir.Value, ...], name: str, dtype: ir.DataType) -> ir.Value:
        """``[layers, H_kv, K]`` from the per-layer ``[1, H_kv, K]`` values."""
        stacked = b.op("Concat", list(parts), name, axis=0)
        stacked.name = name
        return typed(stacked, [len(parts), self.layout.kv_heads, self.kept], dtype)

    def _geometry(self, b: NodeBuilder, present: ir.Value, seq) -> dict[str, ir.Value]:
        """Values every layer shares: positions, the start of the protected recent run and its flags, ``K``."""
        i64 = ir.DataType.INT64
        shape = typed(b.op("Shape", [present]), [4], i64)
        length = typed(b.op("Gather", [shape, b.const(2)], "length", axis=0), [], i64)
        count, recent = self._counts(b, length)
        before = typed(b.op("Sub", [length, recent]), [], i64)
        start = typed(b.op("Max", [before, b.const(0)], "recent_start"), [], i64)
        columns = typed(b.op("Range", [b.const(0), length, b.const(1)], "columns"), [seq], i64)
        recent_flags = typed(b.op("GreaterOrEqual", [columns, start], "recent"), [seq], ir.DataType.BOOL)
        return {"length": length, "start": start, "columns": columns, "recent": recent_flags, "count": count}

    def _counts(self, b: NodeBuilder, length: ir.Value) -> tuple[ir.Value, ir.Value]:
        """``K`` (``[1]``) and the protected count (scalar): ``min(T, budget)`` and ``protected``, or with a
        ``prompt_share`` ``floor(T * share)`` and ``floor(K * recent_share)`` (integer ``Mul`` then ``Div``)."""
        i64, method = ir.DataType.INT64, self.method
        length_1d = typed(b.op("Reshape", [length, b.const([1])]), [1], i64)
        if method.prompt_share is None:
            count = typed(b.op("Min", [length_1d, b.const([method.budget])], "count"), [1], i64)
            return count, b.const(method.protected)
        count = _floor_share(b, length_1d, method.prompt_share, "count")
        recent = _floor_share(b, count, method.recent_share, "protected")
        return count, typed(b.op("Reshape", [recent, b.const(np.zeros(0, np.int64))]), [], i64)

    def _snapkv_score(self, b: NodeBuilder, layer: DecoderLayer, geo: dict[str, ir.Value], seq) -> ir.Value:
        method, layout = self.method, self.layout
        real, i64 = layer.cache_outputs[0].dtype, ir.DataType.INT64
        heads, kv, groups = layout.heads, layout.kv_heads, layout.heads // layout.kv_heads
        rows = f"min({seq},{method.window})"
        window_rows = typed(b.op("Range", [geo["start"], geo["length"], b.const(1)], "window_rows"), [rows], i64)
        row_axis = typed(b.unsqueeze(window_rows, [1]), [rows, 1], i64)
        causal = typed(b.op("LessOrEqual", [geo["columns"], row_axis], "causal"), [rows, seq], ir.DataType.BOOL)
        lowest = b.const(np.finfo(real.numpy()).min, "masked", dtype=real.numpy())
        zero = b.const(0.0, "zero", dtype=real.numpy())
        matmul = logits_matmul(layer.softmax)
        start = typed(b.op("Reshape", [geo["start"], b.const([1])]), [1], i64)
        query = b.op("Slice", [matmul.inputs[0], start, b.const([2**62]), b.const([2])], "window_query")
        typed(query, [1, heads, rows, layout.head_dim], real)
        logits = typed(b.op("MatMul", [query, matmul.inputs[1]], "window_logits"), [1, heads, rows, seq], real)
        masked = typed(b.op("Where", [causal, logits, lowest]), [1, heads, rows, seq], real)
        probs = typed(b.op("Softmax", [masked], axis=-1), [1, heads, rows, seq], real)
        summed = typed(b.reduce("ReduceSum", probs, [2], keepdims=False), [1, heads, seq], real)
        prefix = typed(b.op("Where", [geo["recent"], zero, summed]), [1, heads, seq], real)
        grouped = typed(b.op("Reshape", [prefix, b.const([1, kv, groups, -1])]), [1, kv, groups, seq], real)
        score = typed(b.reduce("ReduceMean", grouped, [2], keepdims=True), [1, kv, 1, seq], real)
        pad = method.kernel // 2
        pool = {"kernel_shape": [1, method.kernel], "pads": [0, pad, 0, pad], "strides": [1, 1]}
        if method.pool == "avg":
            pooled = b.op("AveragePool", [score], "pool", count_include_pad=1, **pool)
        else:
            pooled = b.op("MaxPool", [score], "pool", **pool)
        typed(pooled, [1, kv, 1, seq], real)
        return typed(b.op("Reshape", [pooled, b.const([1, kv, -1])]), [1, kv, seq], real)

    def _a2sf_score(self, b: NodeBuilder, layer: DecoderLayer, geo: dict[str, ir.Value], seq) -> ir.Value:
        layout, real = self.layout, layer.cache_outputs[0].dtype
        heads, kv, groups = layout.heads, layout.kv_heads, layout.heads // layout.kv_heads
        last = typed(b.op("Sub", [geo["length"], b.const(1)]), [], ir.DataType.INT64)
        age = typed(b.op("Sub", [last, geo["columns"]], "age"), [seq], ir.DataType.INT64)
        age_real = typed(b.op("Cast", [age], to=real), [seq], real)
        factor = b.const(float(self.method.forgetting_factor), "forgetting_factor", dtype=real.numpy())
        weights = typed(b.op("Pow", [factor, age_real], "row_weights"), [seq], real)
        row = typed(b.op("Reshape", [weights, b.const([1, 1, 1, -1])]), [1, 1, 1, seq], real)
        probs = layer.softmax.outputs[0]
        accumulated = typed(b.op("MatMul", [row, probs], "accumulated"), [1, heads, 1, seq], real)
        grouped = typed(b.op("Reshape", [accumulated, b.const([1, kv, groups, -1])]), [1, kv, groups, seq], real)
        return typed(b.reduce("ReduceSum", grouped, [2], keepdims=False), [1, kv, seq], real)

    def _layer(
        self, b: NodeBuilder, layer: DecoderLayer, geo: dict[str, ir.Value], seq
    ) -> tuple[ir.Value, ir.Value | None]:
        kv, real, i64 = self.layout.kv_heads, layer.cache_outputs[0].dtype, ir.DataType.INT64
        score = FACES.lookup("cache_score", self.method)(self, b, layer, geo, seq)
        top = b.const(np.finfo(real.numpy()).max, "recent_priority", dtype=real.numpy())
        priority = typed(b.op("Where", [geo["recent"], top, score], "priority"), [1, kv, seq], real)

        values, chosen = b.op("TopK", [priority, geo["count"]], "select", 2, axis=-1, largest=1, sorted=1)
        typed(values, [1, kv, self.kept], real)
        typed(chosen, [1, kv, self.kept], i64)
        keep = b.ascending(chosen, geo["count"], [1, kv, self.kept])
        kept_score = None
        if self.method.scores_output:
            kept_score = b.op("GatherElements", [score, keep], "kept_score", axis=2)
            typed(kept_score, [1, kv, self.kept], real)

        index = typed(b.unsqueeze(keep, [3]), [1, kv, self.kept, 1], i64)
        lead = typed(b.op("Shape", [index], end=3), [3], i64)
        size = typed(b.op("Concat", [lead, b.const([self.layout.head_dim])], axis=0), [4], i64)
        expanded = typed(b.op("Expand", [index, size]), [1, kv, self.kept, self.layout.head_dim], i64)
        for full in layer.cache_outputs:
            gathered = b.op("GatherElements", [full, expanded], axis=2)
            typed(gathered, [1, kv, self.kept, full.shape[3]], full.dtype)
            slot = next(i for i, out in enumerate(self.graph.outputs) if out is full)
            full.name, gathered.name = f"{full.name}_full", full.name
            self.graph.outputs[slot] = gathered
        return keep, kept_score

    def ensures(self, model: ir.Model) -> None:
        for value in model.graph.outputs:
            if value.name.startswith("present_") and (value.shape is None or str(value.shape[2]) != self.kept):
                raise GraphRewriteError(
                    f"{self.method.name}: {value.name} does not carry the compressed length after the pass"
                )


register("cache_score", SnapKV)(PromptCachePass._snapkv_score)
register("cache_score", A2SF)(PromptCachePass._a2sf_score)


@register("export", PromptCacheCompression)
def rewrite(graphs: dict[str, ir.Model], method: PromptCacheCompression) -> dict[str, ir.Model]:
    """SnapKV's / A2SF's export: the prefill graph outputs the compressed prompt cache; decode graphs unchanged."""
    run_passes(graphs["prefill"], [PromptCachePass(method)])
    return graphs
