"""``tokensieve inspect`` for MLLM artifacts: graphs, decoder geometry and cache, image span, decoder sites."""

from __future__ import annotations

from typing import Any


def inspect_mllm(artifact) -> dict[str, Any]:
    m = artifact.manifest
    graphs = {
        key: {
            "file": path,
            "inputs": m["io"][key]["inputs"],
            "outputs": m["io"][key]["outputs"],
            "dynamic": m["dynamic"].get(key),
            "lint_ok": m["lint"][key]["ok"],
            "lint_errors": len(m["lint"][key]["errors"]),
            "export_seconds": m["export"]["seconds"].get(key),
        }
        for key, path in m["graphs"].items()
        if key != "external_data"
    }
    return {
        "kind": "mllm",
        "path": str(artifact.path),
        "source": m["source"],
        "architecture": m["architecture"],
        "method": m.get("method_text", "none"),
        "reduction": _reduction(m),
        "export": m["export"],
        "graphs": graphs,
        "decoder": m["decoder"],
        "image_tokens": m["image_tokens"],
        "image_token_id": m["host"]["image_token_id"],
        "sites": m["sites"],
        "lint_target": m["lint_target"],
        "cost": _cost(artifact),
    }


def _cost(artifact) -> dict[str, Any] | None:
    """The plan of the artifact's method at a 60-token prompt besides the image (``None``: data-dependent)."""
    from tokensieve.plan.mllm import mllm_plan_dict, plan_artifact

    planned = plan_artifact(artifact)
    return None if planned is None else mllm_plan_dict(*planned)


def _reduction(manifest: dict[str, Any]) -> str | None:
    """What a decoder method does to the sequence or the cache, in words."""
    from tokensieve.methods import methods_from_dicts

    methods = {x.name: x for x in methods_from_dicts(manifest.get("methods"))}
    capacity = manifest["decoder"]["capacity"]
    if "streamingllm" in methods:
        sink = methods["streamingllm"].sink
        return (
            f"the cache keeps the first {sink} positions (attention sinks) and the latest {capacity - sink}; "
            "the fixed decode graph is a ring (slot and visible slots from the host)"
        )
    h2o = methods.get("h2o")
    if h2o is not None:
        factor = float(h2o.forgetting_factor)
        forgetting = "" if factor == 1 else f", older attention weighted by {factor:g} per step (A2SF)"
        return (
            f"every layer and KV head caches at most {h2o.budget} positions: the last {h2o.recent} and the heavy "
            f"hitters (the most attention accumulated since they were cached{forgetting}); prefill keeps them among "
            f"the prompt, then the decode graph evicts the lightest older one per step once {h2o.slots()} are cached"
        )
    compression = methods.get("snapkv") or methods.get("a2sf")
    if compression is not None:
        if compression.name == "snapkv":
            how = f"the prefix positions they attend to most ({compression.pool}-pooled over {compression.kernel})"
        else:
            how = (
                "the earlier positions with the most attention accumulated over the prompt, rows weighted by "
                f"{float(compression.forgetting_factor):g}^age"
            )
        return (
            f"after prefill every layer and KV head caches at most {compression.budget} prompt positions: the last "
            f"{compression.protected} and {how}; new tokens are cached after them at their absolute positions"
        )
    globalcom2 = methods.get("globalcom2")
    if globalcom2 is not None:
        tokens = manifest["image_tokens"]["per_crop"]
        layout = "the official code's packing" if globalcom2.layout == "official" else "grid positions"
        return (
            f"the image keeps {globalcom2.thumbnail_count(tokens)} of {tokens} thumbnail tokens and about "
            f"{float(globalcom2.retention):g} of each crop's (budgets from the thumbnail's attention, temperature "
            f"{float(globalcom2.temperature):g}) plus the row newlines ({layout}); the host selects from the vision "
            "graph's cls_scores, and prefill runs on the shorter prompt"
        )
    atp = methods.get("atp_llava")
    if atp is not None:
        count = manifest["image_tokens"]["count"]
        rule = f"> {atp.threshold:g}" if atp.threshold is not None else f"> mean + {atp.offset:g} std (per image)"
        return (
            f"before each of layers {list(atp.layers)}, the image tokens still present whose redundancy score "
            f"(the layer before: image-to-image logits and text-to-image attention) is {rule} stay, plus a spatial "
            f"grid of {len(atp.grid_positions(count))} of {count}, with every text token at its original position; "
            f"the host decides between the prefill segments prefill_0..prefill_{len(atp.cuts)}, so counts vary per "
            "image"
        )
    mustdrop = methods.get("mustdrop")
    if mustdrop is not None:
        count = manifest["image_tokens"]["count"]
        merge = (
            "no window merge"
            if mustdrop.merge_threshold is None
            else f"the 3x3 windows of the {count} patch tokens with mean cosine >= {mustdrop.merge_threshold:g} after "
            "CLIP layer 0 merge into one token each (host, between vision_0 and vision_1)"
        )
        return (
            f"{merge}; a key set of ceil({float(mustdrop.key_ratio):g} * n) image tokens (the last CLIP layer's CLS "
            f"attention) is never dropped; after each of layers {list(mustdrop.layers)} the image tokens whose "
            f"attention from the text after the image is below {mustdrop.global_threshold:g} of the total (column "
            f"sum) and below {mustdrop.individual_threshold:g} (column max) are dropped, later layers at contiguous "
            f"positions; the host decides between prefill_0..prefill_{len(mustdrop.cuts)}, and after prefill layers "
            f"{mustdrop.layers[0]}.. keep only the final tokens' cache"
        )
    dyvte = methods.get("dyvte")
    if dyvte is not None:
        return (
            f"before each of layers {list(dyvte.layers)}, every image token is removed once the last prompt token's "
            f"attention mass on the image (the layer before, head mean) is below {dyvte.threshold:g}; text keeps its "
            f"positions; the host decides between the prefill segments prefill_0..prefill_{len(dyvte.cuts)}"
        )
    fastv = methods.get("fastv")
    if fastv is None:
        return None
    image = manifest["image_tokens"]
    kept = f"{fastv.kept_count(image['count'])} of {image['count']}" if "count" in image else "ceil(keep * N) of N"
    return (
        f"layers {fastv.k}..{manifest['decoder']['layers'] - 1} keep {kept} image tokens (the most attended by the "
        f"last prompt token in layer {fastv.k - 1}) and every text token, at their original positions"
    )


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
