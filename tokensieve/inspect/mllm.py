"""``tokensieve inspect`` for MLLM artifacts: graphs, decoder geometry and cache, image span, decoder sites."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokensieve.manifest import MllmManifest


def inspect_mllm(artifact) -> dict[str, Any]:
    m = artifact.manifest
    graphs = {
        key: {
            "file": path,
            "inputs": m.io[key]["inputs"],
            "outputs": m.io[key]["outputs"],
            "dynamic": m.dynamic.get(key),
            "lint_ok": m.lint[key]["ok"],
            "lint_errors": len(m.lint[key]["errors"]),
            "export_seconds": m.export["seconds"].get(key),
        }
        for key, path in m.graphs.items()
        if key != "external_data"
    }
    return {
        "kind": "mllm",
        "path": str(artifact.path),
        "source": m.source,
        "architecture": m.architecture,
        "method": m.method_text,
        "reduction": _reduction(m),
        "export": m.export,
        "graphs": graphs,
        "decoder": m.decoder,
        "image_tokens": m.image_tokens,
        "image_token_id": m.host["image_token_id"],
        "sites": m.sites,
        "lint_target": m.lint_target,
        "cost": _cost(artifact),
    }


def _cost(artifact) -> dict[str, Any] | None:
    """The plan of the artifact's method at a 60-token prompt besides the image (``None``: data-dependent)."""
    from tokensieve.plan.mllm import mllm_plan_dict, plan_artifact

    planned = plan_artifact(artifact)
    return None if planned is None else mllm_plan_dict(*planned)


def _reduction(manifest: MllmManifest) -> str | None:
    """What a decoder method does to the sequence or the cache, in words (the method's ``explain``)."""
    from tokensieve.methods import methods_from_dicts

    method = next(iter(methods_from_dicts(manifest.methods)), None)
    return None if method is None else method.explain(manifest.decoder, manifest.image_tokens)


def _shape(value: dict[str, Any]) -> str:
    return f"{value['name']} [{', '.join(str(d) for d in value['shape'] or ['?'])}]"


def format_mllm(info: dict[str, Any]) -> str:
    src, dec = info["source"], info["decoder"]
    lines = [
        f"artifact   {info['path']}",
        f"source     {src['kind']}:{src['name']} ({info['architecture']})",
        f"method     {info['method']}" + (f"\n           {info['reduction']}" if info["reduction"] else ""),
        f"export     {info['export']['exporter']}, opset {info['export']['opset']}",
        f"graphs     (lint {info['lint_target']}; symbolic axes are for TensorRT optimization profiles)",
    ]
    for g in info["graphs"].values():
        verdict = "OK" if g["lint_ok"] else f"{g['lint_errors']} errors"
        lines.append(f"  {g['file']:<20} lint {verdict}, exported in {g['export_seconds']} s")
        lines.append(
            f"    in   {', '.join(_shape(v) for v in g['inputs'][:4])}{' ...' if len(g['inputs']) > 4 else ''}"
        )
        lines.append(
            f"    out  {', '.join(_shape(v) for v in g['outputs'][:3])}{' ...' if len(g['outputs']) > 3 else ''}"
        )
        if g["dynamic"]:
            lines.append(f"    dynamic: {g['dynamic']}")
    lines.append(
        f"decoder    {dec['layers']} layers, {dec['heads']} heads, {dec['kv_heads']} KV heads, head dim "
        f"{dec['head_dim']}, hidden {dec['hidden']}, vocab {dec['vocab']}; fixed cache {dec['capacity']} slots"
    )
    image = info["image_tokens"]
    count = f"{image['count']} tokens" if "count" in image else f"{image['per_crop']} per crop, {image['rule']}"
    lines.append(f"image      {count}; span = the run of image_token_id {info['image_token_id']} in input_ids")
    lines.append(_format_cost(info["cost"], info["method"]))
    for key, layout in info["sites"].items():
        lines.append(f"sites      {key} (cache: {layout['cache']}, located with {layout['located_with']})")
        for s in layout["sites"]:
            lines.append(
                f"  {s['name']:<9} stream {s['stream_in']} -> {s['post_attention']} (after attention) -> "
                f"{s['stream_out']}"
            )
            lines.append(
                f"            Q {s['query']['value']} {s['query']['shape']}, K {s['key']['value']} "
                f"{s['key']['shape']}, V {s['value']['value']}"
            )
            outputs = ", ".join(s["cache_out"])
            if s["cache_read"]:
                writes = ", ".join(s["cache_write"])
                lines.append(f"            cache {', '.join(s['cache_read'])} -> {writes} -> {outputs}")
            elif outputs:
                lines.append(f"            cache outputs {outputs} (keys after RoPE; no cache input)")
    return "\n".join(lines)


def _format_cost(cost: dict[str, Any] | None, method: str) -> str:
    if cost is None:
        return f"cost       {method} keeps a data-dependent count: `tokensieve bench` measures it"
    prompt, rows = cost["prompt"], cost["rows"]
    row = rows[-1]
    new = "any number of new tokens" if row["unbounded"] else f"{prompt['new_tokens']} new tokens"
    versus = f" (MAC-limit speedup {row['limit_speedup']:.2f}x)" if len(rows) > 1 else ""
    vision = "" if prompt["vision_macs"] is None else f"vision {prompt['vision_macs'] / 1e9:.3g} GMACs, "
    return (
        f"cost       {prompt['image_tokens']} image + {prompt['text_tokens']} text tokens and {new} in "
        f"{row['slots']} slots: {vision}prefill {row['prefill_macs'] / 1e9:.3g} GMACs{versus}, cache "
        f"{row['cache_mib']:.3g} MiB float32, decode {row['decode_macs'] / 1e9:.3g} GMACs/token (`tokensieve plan`)"
    )
