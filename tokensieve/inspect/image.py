"""``tokensieve inspect``: what an artifact contains, from its manifest."""

from __future__ import annotations

from typing import Any


def _stages(stages: dict[str, Any]) -> dict[str, Any]:
    info = stages["graph_info"]
    return {
        "sites": stages["sites"],
        "buckets": stages["buckets"],
        "calibration": stages["calibration"],
        "allow_truncation": stages["allow_truncation"],
        "graphs": {
            path: {"macs": g["macs"], "lint_ok": g["lint"]["ok"], "lint_errors": len(g["lint"]["errors"])}
            for path, g in info.items()
        },
    }


def inspect_artifact(artifact) -> dict[str, Any]:
    if artifact.kind == "mllm":
        from tokensieve.inspect.mllm import inspect_mllm

        return inspect_mllm(artifact)
    m = artifact.manifest
    layout = m.layout or {}
    tokens = m.tokens_per_block or {}
    blocks = []
    for i, block in enumerate(layout.get("blocks", [])):
        blocks.append(
            {
                "index": i,
                "name": block["name"],
                "tokens_baseline": (tokens.get("baseline") or [None] * (i + 1))[i],
                "tokens_model": (tokens.get("model") or [None] * (i + 1))[i],
                "attention": block["attention"],
                "heads": block["heads"],
            }
        )
    return {
        "path": str(artifact.path),
        "source": m.source,
        "method": m.method_text,
        "export": m.export,
        "inputs": m.inputs,
        "outputs": m.outputs,
        "specials": layout.get("specials"),
        "located_with": layout.get("located_with"),
        "locate_error": m.locate_error,
        "blocks": blocks,
        "sites": m.sites,
        "stages": _stages(m.stages) if artifact.kind == "staged" else None,
        "macs": m.macs,
        "quantization": m.quantization,
        "lint": {
            "target": m.lint["target"],
            "ok": m.lint["ok"],
            "errors": len(m.lint["errors"]),
            "warnings": len(m.lint["warnings"]),
        },
    }


def format_inspection(info: dict[str, Any]) -> str:
    if info.get("kind") == "mllm":
        from tokensieve.inspect.mllm import format_mllm

        return format_mllm(info)
    src = info["source"]
    lines = [
        f"artifact   {info['path']}",
        f"source     {src['kind']}:{src['name']}" if src["kind"] != "onnx" else f"source     {src['name']}",
        f"method     {info['method']}",
        f"export     {info['export']['exporter']}, opset {info['export']['opset']}, "
        f"batch {info['export']['batch'] or 'dynamic'}",
        "inputs     " + ", ".join(f"{i['name']} {i['shape']}" for i in info["inputs"]),
        "outputs    " + ", ".join(f"{o['name']} {o['shape']}" for o in info["outputs"]),
    ]
    if info["locate_error"]:
        lines.append(f"blocks     not located: {info['locate_error']}")
    else:
        lines.append(
            f"blocks     {len(info['blocks'])} found ({info['located_with']}), {info['specials']} special token(s)"
        )
        staged = info["stages"] is not None
        lines.append("           block                  tokens in " + ("" if staged else "(baseline -> model)"))
        sites = {s["layer"]: s for s in info["sites"]}
        for b in info["blocks"]:
            note = ""
            if b["index"] in sites:
                s = sites[b["index"]]
                params = ", ".join(f"{k}={v}" for k, v in s.get("params", {}).items())
                note = f"   <- {s['method']}({params}) -> {s['tokens_out']} tokens"
            if staged:
                note = "   <- decision site (data-dependent count)" if b["index"] in info["stages"]["sites"] else ""
                lines.append(f"           {b['index']:>2} {b['name']:<20} {b['tokens_baseline']:>5}{note}")
            else:
                tokens = f"{b['tokens_baseline']:>5} -> {b['tokens_model']:<5}"
                lines.append(f"           {b['index']:>2} {b['name']:<20} {tokens}{note}")
    if info["stages"] is not None:
        lines += _format_stages(info["stages"], info["macs"])
    macs = info["macs"]
    if info["stages"] is None and macs["limit_speedup"] is None:  # a graph without MatMul / Conv / Attention
        lines.append("MACs       none counted (no MatMul, Gemm, Conv or Attention with known shapes)")
    elif info["stages"] is None:
        lines.append(
            f"MACs       {macs['model'] / 1e9:.3f} G per sample (baseline {macs['baseline'] / 1e9:.3f} G, "
            f"MAC-limit speedup {macs['limit_speedup']:.3f}x)"
        )
    q = info.get("quantization")
    if q:
        lines.append(
            f"precision  {q['dtype'].upper()} {q['format']} ({'symmetric' if q['symmetric'] else 'asymmetric'}, "
            f"on {'/'.join(q['op_types'])}; {q['calibration']} on {q['images']} images; token selection float32); "
            f"drift budget {q['tolerance']:g} of the output scale, site agreement >= {q['min_agreement']:g}"
        )
    lint = info["lint"]
    lines.append(
        f"lint       {lint['target']}: {'OK' if lint['ok'] else 'FAILED'} "
        f"({lint['errors']} errors, {lint['warnings']} warnings)"
    )
    return "\n".join(lines)


def _format_stages(stages: dict[str, Any], macs: dict[str, Any]) -> list[str]:
    calibration = stages["calibration"]
    routes = "; ".join(f"after {route}: {sizes}" if route else f"{sizes}" for route, sizes in stages["buckets"].items())
    lines = [f"buckets    {routes}"]
    if "threshold" in calibration:
        lines.append(
            f"threshold  {calibration['threshold']:.4f} (target keep {calibration['target_keep']:g}, "
            f"achieved {calibration['achieved_keep']:.3f} on {calibration['samples']} images)"
        )
    for i, plan in enumerate(calibration.get("plans", [])):
        counts = calibration["counts"]
        lines.append(
            f"counts     site {i}: {counts['min'][i]}..{counts['max'][i]} (mean {counts['mean'][i]:.1f}); "
            f"expected padding {plan['padding_tokens']:.1f} tokens, +{100 * plan['expected_waste']:.1f} % "
            "compute over exact counts"
        )
    if macs.get("expected"):
        lines.append(
            f"expected   {macs['expected'] / 1e9:.3f} GMACs per image over the calibration data "
            f"({macs['baseline'] / macs['expected']:.3f}x fewer than unreduced)"
        )
    bad = [p for p, g in stages["graphs"].items() if not g["lint_ok"]]
    verdict = "all clean" if not bad else "errors in " + ", ".join(bad)
    lines.append(
        f"graphs     {len(stages['graphs'])} stage graphs; lint: {verdict}; pad-to-max graph "
        f"{macs['model'] / 1e9:.3f} G, unreduced {macs['baseline'] / 1e9:.3f} G per image"
    )
    return lines
