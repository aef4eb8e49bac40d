"""``tokensieve plan`` for MLLMs: what a decoder method costs and caches, before exporting anything.

From the language model's sizes alone (config only: no weights, no export; any LLaVA / LLaVA-NeXT preset or local
checkpoint or config directory, or an MLLM artifact) and a prompt (image tokens, text tokens, new tokens), each
candidate gets:

* the tokens each decoder layer processes in prefill and the prefill MACs, with the MAC-limit speedup over the
  unreduced model;
* the positions each layer caches (per KV head) at the end of the generation;
* the fixed-capacity decode graph it needs: slots (the ``--capacity`` to export with; StreamingLLM's is the given
  capacity, H2O's ``budget + 1``, both for any number of new tokens), its float32 cache size (keys and values of
  every layer, plus H2O's score state; head classes with cache tensors of their own, RazorAttention's, at their
  slots), and the MACs of one decode step at that capacity;
* the MAC-limit speedup of the whole prefill, the vision graph included: the CLIP layers up to the selected feature
  layer and the projector, once per crop (LLaVA-NeXT: thumbnail + crop grid of the image size). Every planned
  method leaves the vision graph as it is, so its MACs (shown once, with the prompt) dilute the decoder's speedup.

MACs count what the exported graphs compute (projections, MLP, ``Q·Kᵀ`` and ``P·V`` over the full ``T × T`` of the
prefill graph and over every slot of the fixed decode graph, the last-position LM head) plus each method's scoring
products: FastV's attention row, SnapKV's observation-window rows, A2SF's / H2O's weighted sum of the probabilities.
The vision graph's MACs are its patch convolution, the ``1 + n``-token encoder layers and the projector. A test holds
these numbers to the MACs counted in the exported graphs. Methods whose counts depend on the image or
prompt (``atp_llava``, ``dyvte``, ``mustdrop``, ``globalcom2``) are measured with ``tokensieve bench`` instead.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tokensieve.errors import MethodSpecError, SourceError
from tokensieve.methods import MLLM_METHODS, describe, parse_methods
from tokensieve.methods.base import check_target
from tokensieve.methods.decoder import PlanCost, PlanInput
from tokensieve.runtimes.image_families import image_family


@dataclass
class MllmPlanRow:
    method: str
    tokens_per_layer: list[int]  # prefill sequence each decoder layer processes
    prefill_macs: int
    limit_speedup: float  # unreduced prefill MACs / these
    limit_speedup_with_vision: float | None  # the same with the vision graph's MACs on both sides
    cached_per_layer: list[int]  # positions each layer caches per KV head at the end of the generation
    slots: int  # the fixed decode graph's capacity this generation needs
    unbounded: bool  # any number of new tokens fits those slots (StreamingLLM, H2O)
    cache_mib: float  # the fixed cache at those slots, float32 (plus H2O's score state)
    decode_macs: int  # one fixed-cache decode step
    # head class -> KV heads, positions held, slots of its cache tensors, their MiB
    cache_classes: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class MllmPrompt:
    image_tokens: int
    text_tokens: int
    new_tokens: int
    crops: int | None = None  # vision graph runs (LLaVA-NeXT: thumbnail + grid); None: unknown
    vision_macs: int | None = None  # of those runs (None: a vision tower this plan does not model)

    @property
    def length(self) -> int:
        return self.image_tokens + self.text_tokens


def image_token_count(host: dict[str, Any], size: tuple[int, int] | None = None) -> tuple[int, int]:
    """``(sequence positions, vision crops)`` of one image of ``size = (height, width)``: LLaVA: fixed, one crop;
    LLaVA-NeXT: thumbnail + unpadded crop grid + a newline per row; InternVL: tiles (+ thumbnail) x tokens per tile
    (default size: the vision input side, square; the family's ``count``);
    Qwen-VL: the processor's resized grid, merged (default size: 672 x 672), one run."""
    return image_family(host).count(host, size)


def vision_macs(vision: dict[str, int], host: dict[str, Any], size: tuple[int, int] | None = None) -> int:
    """Multiply-accumulates of one vision run. CLIP (LLaVA) and InternViT (InternVL): one crop / tile through the
    patch convolution, the encoder layers up to the feature layer on CLS + patches, the two-layer projector on the
    features it keeps (InternVL: ``merge`` patches folded into one feature by the pixel shuffle). Qwen-VL: the
    whole image of ``size`` through the tower and merger (its family's ``vision_macs``)."""
    family = image_family(host)
    if family.vision_macs is not None:
        return family.vision_macs(vision, host, size)
    hidden, width = vision["hidden"], vision["projector"]
    patches = (vision["image_size"] // vision["patch_size"]) ** 2
    tokens = patches + 1
    embedding = patches * hidden * vision["channels"] * vision["patch_size"] ** 2
    layer = tokens * (4 * hidden * hidden + 2 * hidden * vision["intermediate"]) + 2 * tokens * tokens * hidden
    features, merged = image_family(host).tile_tokens(host), hidden * vision.get("merge", 1)
    return embedding + vision["layers"] * layer + features * (merged * width + width * width)


def _source(source: str) -> tuple[dict[str, int], dict[str, int] | None, dict[str, Any], int]:
    """``(decoder sizes, vision sizes, host facts, default capacity)`` of an MLLM artifact or an ``hf:`` source."""
    path = Path(source)
    if path.is_dir() and (path / "manifest.json").is_file():
        from tokensieve.artifact.store import Artifact

        manifest = Artifact.load(path).manifest
        if manifest.kind != "mllm":
            raise SourceError(f"{source} is an image-model artifact; this plan takes an MLLM")
        decoder = dict(manifest.decoder)
        return decoder, manifest.vision, manifest.host, decoder.pop("capacity")
    from tokensieve.converters.families import default_capacity, host_config, mllm_config
    from tokensieve.converters.llava import decoder_geometry

    name = source.removeprefix("hf:")
    config, family, processor = mllm_config(name)
    text = config.text_config
    host = host_config(config, family, processor)
    return decoder_geometry(text), family.vision_geometry(config), host, default_capacity(name, text)


def _layer_macs(decoder: dict[str, int], tokens: int, keys: int) -> int:
    """One decoder layer on ``tokens`` queries attending over ``keys`` positions."""
    hidden, heads, kv, head_dim = decoder["hidden"], decoder["heads"], decoder["kv_heads"], decoder["head_dim"]
    projections = hidden * head_dim * (2 * heads + 2 * kv) + 3 * hidden * decoder["intermediate"]
    return tokens * projections + 2 * tokens * keys * heads * head_dim


def prefill_macs(decoder: dict[str, int], lengths: list[int]) -> int:
    """Multiply-accumulates of one prefill whose layer ``i`` sees ``lengths[i]`` tokens (full ``T × T``
    attention, as the exported graph computes it), with the last position's LM head; no method scoring."""
    return sum(_layer_macs(decoder, t, t) for t in lengths) + decoder["hidden"] * decoder["vocab"]


def _row(decoder: dict[str, int], method, prompt: MllmPrompt, capacity: int) -> MllmPlanRow:
    layers, heads, head_dim = decoder["layers"], decoder["heads"], decoder["head_dim"]
    p = PlanInput(
        layers, heads, head_dim, prompt.image_tokens, prompt.length, prompt.new_tokens, capacity, decoder["kv_heads"]
    )
    cost = PlanCost.unreduced(p) if method is None else method.plan(p)
    prefill = prefill_macs(decoder, cost.tokens) + cost.scoring
    decode = layers * _layer_macs(decoder, 1, cost.slots) + decoder["hidden"] * decoder["vocab"]
    slots = {name: cost.class_slots.get(name, cost.slots) for name in cost.classes}
    own = {name: kv for name, (kv, _) in cost.classes.items() if name in cost.class_slots}  # own cache tensors
    allocated = (layers * decoder["kv_heads"] - sum(own.values())) * cost.slots
    allocated += sum(kv * slots[name] for name, kv in own.items())
    cache_bytes = allocated * (2 * head_dim * 4 + cost.state_bytes)
    return MllmPlanRow(
        method=describe([method]) if method else "none",
        tokens_per_layer=cost.tokens,
        prefill_macs=prefill,
        limit_speedup=0.0,  # set against the unreduced row
        limit_speedup_with_vision=None,
        cached_per_layer=cost.cached,
        slots=cost.slots,
        unbounded=cost.unbounded,
        cache_mib=cache_bytes / 2**20,
        decode_macs=decode,
        cache_classes={
            name: {
                "kv_heads": kv,
                "positions": held,
                "slots": slots[name],
                "mib": kv * slots[name] * 2 * head_dim * 4 / 2**20,
            }
            for name, (kv, held) in cost.classes.items()
        },
    )


def _planned(text: str):
    """The one decoder method of ``text``, if its cost does not depend on the data (a typed error otherwise)."""
    parsed = parse_methods(text)
    check_target(parsed, "mllm")
    if len(parsed) != 1 or parsed[0].data_dependent:
        planned = [cls.name for cls in MLLM_METHODS if not cls.data_dependent]
        measured = [cls.name for cls in MLLM_METHODS if cls.data_dependent]
        raise MethodSpecError(
            f"plan: {text!r}: give one of {', '.join(planned)} ({', '.join(measured[:-1])} and {measured[-1]} keep a "
            "data-dependent count: measure them with `tokensieve bench`)"
        )
    return parsed[0]


def plan_mllm(
    source: str,
    candidates: list[str],
    *,
    text_tokens: int = 60,
    new_tokens: int = 256,
    image_size: tuple[int, int] | None = None,
    image_tokens: int | None = None,
    capacity: int | None = None,
) -> tuple[MllmPrompt, list[MllmPlanRow]]:
    """The prompt planned for and one row for the unreduced model, then one per candidate method string.
    ``image_tokens`` overrides the count of the image size; the vision cost then stays unknown for LLaVA-NeXT
    unless ``image_size`` is given too."""
    decoder, vision, host, default_capacity = _source(source)
    counted, crops = image_token_count(host, image_size)
    if image_tokens is None:
        image_tokens = counted
    elif image_size is None and image_family(host).varies:
        crops = None  # the count does not say which image (LLaVA-NeXT's crops, InternVL's tiles, Qwen-VL's grid)
    for name, value in (("image tokens", image_tokens), ("text tokens", text_tokens), ("new tokens", new_tokens)):
        if value < 0:
            raise MethodSpecError(f"plan: {name} must be >= 0, got {value}")
    prompt = MllmPrompt(image_tokens, text_tokens, new_tokens, crops)
    if vision is not None and crops is not None:
        prompt.vision_macs = crops * vision_macs(vision, host, image_size)
    capacity = capacity or default_capacity
    methods = [None, *(_planned(text) for text in candidates)]
    rows = [_row(decoder, method, prompt, capacity) for method in methods]
    for row in rows:
        row.limit_speedup = rows[0].prefill_macs / row.prefill_macs
        if prompt.vision_macs is not None:
            row.limit_speedup_with_vision = (prompt.vision_macs + rows[0].prefill_macs) / (
                prompt.vision_macs + row.prefill_macs
            )
    return prompt, rows


def plan_artifact(artifact, text_tokens: int = 60) -> tuple[MllmPrompt, list[MllmPlanRow]] | None:
    """The artifact's own method (after the unreduced row) at a prompt of ``text_tokens`` besides the image, with
    as many new tokens as its fixed cache holds (any number: 0 planned); ``None`` for methods with data-dependent
    counts."""
    text = artifact.manifest.method_text
    candidates = [] if text == "none" else [text]
    if candidates and parse_methods(text)[0].data_dependent:
        return None
    prompt, rows = plan_mllm(str(artifact.path), candidates, text_tokens=text_tokens, new_tokens=0)
    room = artifact.manifest.decoder["capacity"] - rows[-1].slots
    if rows[-1].unbounded or room <= 0:
        return prompt, rows
    return plan_mllm(str(artifact.path), candidates, text_tokens=text_tokens, new_tokens=room)


def format_mllm_plan(prompt: MllmPrompt, rows: list[MllmPlanRow]) -> str:
    width = max(len(r.method) for r in rows)
    lines = [
        f"prompt: {prompt.image_tokens} image + {prompt.text_tokens} text tokens, {prompt.new_tokens} new tokens; "
        f"fixed-capacity cache in float32; {_vision(prompt)}",
        f"{'method':<{width}}  prefill GMACs  MAC-limit  with vision  slots  cache MiB  decode GMACs/token"
        "  prefill tokens/layer",
    ]
    for r in rows:
        slots = f"{r.slots}{'*' if r.unbounded else ''}"
        prefill, decode = r.prefill_macs / 1e9, r.decode_macs / 1e9
        total = "-" if r.limit_speedup_with_vision is None else f"{r.limit_speedup_with_vision:.3f}x"
        lines.append(
            f"{r.method:<{width}}  {prefill:>13.3f}  {r.limit_speedup:>8.3f}x  {total:>11}  {slots:>5}"
            f"  {r.cache_mib:>9.1f}  {decode:>18.4f}  {_runs(r.tokens_per_layer)}"
        )
        for name, c in r.cache_classes.items():  # KV heads caching different lengths
            lines.append(
                f"  {name}: {c['kv_heads']:g} KV heads x {c['positions']:g} positions in {c['slots']:g} slots, "
                f"{c['mib']:.2f} MiB"
            )
    if any(r.unbounded for r in rows):
        lines.append("* these slots hold any number of new tokens (eviction)")
    return "\n".join(lines)


def _vision(prompt: MllmPrompt) -> str:
    if prompt.vision_macs is not None:
        return f"vision graph {prompt.vision_macs / 1e9:.3f} GMACs ({prompt.crops} crop{'s' * (prompt.crops > 1)})"
    if prompt.crops is None:
        return "vision graph not planned (crops unknown: give --image-size with --image-tokens)"
    return "vision graph not planned (its sizes are unknown: not a CLIP tower, or an artifact older than this plan)"


def _runs(values: list[int]) -> str:
    """``[636, 636, 348, 348, 348]`` -> ``636x2 348x3``."""
    groups = [(value, len(list(run))) for value, run in itertools.groupby(values)]
    return " ".join(f"{value}x{count}" if count > 1 else str(value) for value, count in groups)


def mllm_plan_dict(prompt: MllmPrompt, rows: list[MllmPlanRow]) -> dict[str, Any]:
    return {"prompt": asdict(prompt), "rows": [asdict(r) for r in rows]}
