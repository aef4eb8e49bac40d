"""Latency of an MLLM artifact's graphs: decode per token vs context length (fixed vs growing cache), prefill vs
prompt length, the vision graph, and the export time recorded at export.

The fixed-capacity decode graph always attends over all ``capacity`` slots (masked) and updates its cache in place
(:class:`tokensieve.runtimes.llava.FixedCacheDecoder`), so its cost is flat in the context length; the
growing-cache graph attends over exactly ``L`` past positions but writes a new, one-longer cache every step. The
crossover is what the numbers show. Same protocol as :mod:`tokensieve.bench.image`:
warm-up, the two decode forms alternating in blocks, medians with minima, noisy measurements repeated. Prefill
prompts are laid out ``[BOS, image, text]`` with the manifest's image token count (text only when the image does not
fit), so a FastV, ATP-LLaVA, DyVTE or MustDrop prefill drops what it would drop on a real prompt (ATP-LLaVA, DyVTE,
MustDrop: the prefill time includes every segment graph and the host decisions between them; MustDrop's vision time
includes both vision graphs and the window merge).
"""

from __future__ import annotations

import gc
import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tokensieve.bench.image import pyplot, save_figure, time_alternating
from tokensieve.errors import CapacityError
from tokensieve.methods import methods_from_dicts
from tokensieve.runtimes import FACES
from tokensieve.runtimes.image_families import image_family
from tokensieve.runtimes.kv_cache import cache_inputs, kv_names, position_feeds
from tokensieve.runtimes.llava import VISION
from tokensieve.runtimes.prefill import Prefill, prefill_feeds


@dataclass
class DecodeRow:
    context: int
    fixed_ms: float
    growing_ms: float | None
    fixed_min_ms: float
    growing_min_ms: float | None
    noisy: bool


@dataclass
class LlavaBenchReport:
    source: str
    threads: int
    capacity: int
    decode: list[DecodeRow] = field(default_factory=list)
    prefill_ms: dict[int, float] = field(default_factory=dict)
    vision_ms: float = 0.0
    vision_patches: int = 1
    export_seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def text(self) -> str:
        lines = [
            f"{self.source}: ONNX Runtime CPU, {self.threads} threads, medians of alternating blocks",
            f"decode per token (fixed cache: {self.capacity} slots)",
            "  context   fixed ms   growing ms   growing/fixed",
        ]
        for r in self.decode:
            growing = f"{r.growing_ms:>10.3f}   {r.growing_ms / r.fixed_ms:>13.3f}" if r.growing_ms else "         -"
            lines.append(f"  {r.context:>7}  {r.fixed_ms:>9.3f}   {growing}{'  (noisy)' if r.noisy else ''}")
        lines.append("prefill  " + ", ".join(f"{n} tokens {ms:.2f} ms" for n, ms in self.prefill_ms.items()))
        lines.append(f"vision   {self.vision_ms:.2f} ms ({self.vision_patches} patch(es))")
        lines.append("export   " + ", ".join(f"{k} {v:.1f} s" for k, v in self.export_seconds.items()))
        return "\n".join(lines)


def default_contexts(capacity: int) -> list[int]:
    contexts, n = [], 32
    while n < capacity:
        contexts.append(n)
        n *= 2
    return [*contexts, capacity - 1]


def _median_min(times: list[float]) -> tuple[float, float]:
    return statistics.median(times) * 1e3, min(times) * 1e3


def bench_llava(
    artifact,
    contexts: list[int] | None = None,
    prefill_lengths: list[int] | None = None,
    threads: int = 2,
    warmup: int = 3,
    blocks: int = 4,
    per_block: int = 5,
    noise_ratio: float = 1.15,
    retries: int = 2,
    save: bool = True,
) -> LlavaBenchReport:
    manifest = artifact.manifest
    dec = manifest.decoder
    layers, capacity = dec["layers"], dec["capacity"]
    contexts = contexts or default_contexts(capacity)
    methods = methods_from_dicts(manifest.methods)
    method = methods[0] if methods else None  # an MLLM artifact has one at most
    evicting = method is not None and method.evicts  # any context fits: evicting caches
    for context in contexts:
        if context < 1 or (context >= capacity and not evicting):
            raise CapacityError(
                f"context {context}: a decode step from a context of n positions writes slot n, so contexts must be "
                f"in 1..{capacity - 1} for this artifact's {capacity}-slot cache (export with a larger --capacity)"
            )
    options = {"threads": threads, "spin": False}
    fixed = artifact.runner("decode", **options)
    growing = artifact.runner("decode_growing", **options) if "decode_growing" in manifest.graphs else None
    rng = np.random.default_rng(0)
    names = kv_names(layers)
    report = LlavaBenchReport(manifest.source["name"], threads, capacity)
    caches = [rng.standard_normal(shape, dtype=np.float32) for shape in cache_inputs(fixed).values()]
    # the decoder the runtime would drive for the artifact's method (in place), over random caches
    decoder = FACES.lookup("bench_decoder", method)(fixed, caches, capacity, method, rng)
    for context in contexts:
        runs = {"fixed": lambda c=context: decoder.step(7, c)}  # rewrites slot `context`: same cost every call
        if growing is not None:
            held = min(context, capacity - 1)  # StreamingLLM's host cuts a longer past to the budget
            past = {f"past_{n}": c[:, :, :held].copy() for n, c in zip(names, caches, strict=True)}
            positions = position_feeds(growing, context, decoder.groups)  # MustDrop: the pruned position too
            feeds = {"input_ids": np.array([[7]], np.int64), **positions, **past}
            runs["growing"] = lambda f=feeds: growing.run(f)  # one step from a `context`-long past
        for fn in runs.values():
            for _ in range(warmup):
                fn()
        for _ in range(retries + 1):
            times = time_alternating(runs, blocks, per_block)
            stats = {k: _median_min(v) for k, v in times.items()}
            noisy = any(med > noise_ratio * low for med, low in stats.values())
            if not noisy:
                break
        g = stats.get("growing", (None, None))
        report.decode.append(DecodeRow(context, stats["fixed"][0], g[0], stats["fixed"][1], g[1], noisy))
    prefill = Prefill.from_artifact(artifact, **options)  # one graph, or segments with host decisions
    image_tokens = manifest.image_tokens.get("count") or manifest.image_tokens["per_crop"]
    for length in prefill_lengths or [n for n in contexts if n <= 1024][:4]:
        embeds = rng.standard_normal((1, length, dec["hidden"]), dtype=np.float32)
        span = (1, 1 + image_tokens) if image_tokens + 2 <= length else None  # [BOS, image, text] or text only
        prefill(embeds, span)
        times = time_alternating({"p": lambda e=embeds, s=span: prefill(e, s)}, 3, 1)["p"]
        report.prefill_ms[length] = _median_min(times)[0]
    report.vision_ms, report.vision_patches = _time_vision(artifact, method, options, rng)
    report.export_seconds = manifest.export["seconds"]
    if save:
        (artifact.path / "bench.json").write_text(json.dumps(report.to_dict(), indent=2))
        plot_decode(report, artifact.path / "bench.png")
    return report


def _time_vision(artifact, method, options: dict[str, Any], rng: np.random.Generator) -> tuple[float, int]:
    """The vision graph's median ms on random pixels and the patches it ran (the family's ``bench_tiles``); a
    family with grid-dependent vision graphs (Qwen-VL): one random image of the typical side, preprocessed and
    encoded (one run)."""
    manifest = artifact.manifest
    family = image_family(manifest.host)
    side = manifest.host["image_size"]
    if family.graphs is not None:
        images = family.graphs(artifact.path, manifest.graphs, manifest.host, **options)
        image = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        images.encode(image)
        return _median_min(time_alternating({"v": lambda: images.encode(image)}, 3, 1)["v"])[0], 1
    patches = family.bench_tiles
    pixels = rng.standard_normal((patches, 3, *manifest.host.get("crop", (side, side))), dtype=np.float32)
    graphs = [artifact.runner(key, **options) for key in VISION if key in manifest.graphs]
    split = method if method is not None and method.split_vision else None
    tokens = FACES.lookup("image_tokens", split)

    def run_vision():  # a split vision graph (MustDrop: vision_0, the window merge on the host, vision_1)
        if split is None:
            return graphs[0].run({"pixel_values": pixels})
        return tokens(graphs, pixels, None, manifest.host, None, split)

    run_vision()
    return _median_min(time_alternating({"v": run_vision}, 3, 1)["v"])[0], patches


def export_variants(source: str, variants: dict[str, tuple[Any, int]], directory: Path) -> dict[str, Any]:
    """Export ``source`` once per variant ``name: (method, capacity)`` into subfolders of ``directory``."""
    from tokensieve.exporter.dispatch import export

    artifacts = {}
    for i, (name, (method, capacity)) in enumerate(variants.items()):
        artifacts[name] = export(source, method, out=directory / str(i), capacity=capacity)
        gc.collect()
    return artifacts


def cache_bytes_per_slot(decoder: dict[str, int]) -> int:
    """Bytes one cache slot takes: keys + values of every layer, fp32 (``decoder`` = the manifest's geometry)."""
    return 2 * decoder["layers"] * decoder["kv_heads"] * decoder["head_dim"] * 4


def time_prefills(
    artifacts: dict[str, Any], embeds: np.ndarray, options: dict[str, Any], blocks: int, per_block: int
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, list[float]]]:
    """Each artifact's prefill outputs for ``embeds`` (the warm-up run) and its times in seconds, variants
    alternating in blocks. The sessions are released before returning, so that a benchmark holds one graph kind
    per variant at a time (7B shapes do not fit in memory otherwise)."""
    runners = {name: artifact.runner("prefill", **options) for name, artifact in artifacts.items()}
    outputs, runs = {}, {}
    for name, runner in runners.items():
        method = next(iter(methods_from_dicts(artifacts[name].manifest.methods)), None)  # its host inputs
        feeds = prefill_feeds(runner, embeds, None, method)
        outputs[name] = runner.run(feeds)
        runs[name] = lambda r=runner, f=feeds: r.run(f)
    times = time_alternating(runs, blocks, per_block)
    del runners, runner, runs
    gc.collect()
    return outputs, times


def plot_decode(report: LlavaBenchReport, path) -> bool:
    """Decode ms per token vs context length, fixed vs growing; skipped (False) without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    x = [r.context for r in report.decode]
    ax.plot(x, [r.fixed_ms for r in report.decode], "o-", label=f"fixed cache ({report.capacity} slots)")
    if all(r.growing_ms for r in report.decode):
        ax.plot(x, [r.growing_ms for r in report.decode], "s-", label="growing cache")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens in the cache)")
    ax.set_ylabel("decode ms / token")
    ax.set_title(report.source, fontsize=9)
    ax.legend()
    save_figure(fig, path)
    return True
