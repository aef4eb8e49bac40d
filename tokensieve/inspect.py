"""``tokensieve inspect``: what an artifact contains, from its manifest."""

from __future__ import annotations

from typing import Any


def inspect_artifact(artifact) -> dict[str, Any]:
    m = artifact.manifest
    layout = m.get("layout") or {}
    tokens = m.get("tokens_per_block") or {}
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
        "source": m["source"],
        "method": m.get("method_text", "none"),
        "export": m["export"],
        "inputs": m["inputs"],
        "outputs": m["outputs"],
        "specials": layout.get("specials"),
        "located_with": layout.get("located_with"),
        "locate_error": m.get("locate_error"),
        "blocks": blocks,
        "sites": m.get("sites", []),
        "macs": m["macs"],
        "lint": {
            "target": m["lint"]["target"],
            "ok": m["lint"]["ok"],
            "errors": len(m["lint"]["errors"]),
            "warnings": len(m["lint"]["warnings"]),
        },
    }


def format_inspection(info: dict[str, Any]) -> str:
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
        lines.append("           block                  tokens in (baseline -> model)")
        sites = {s["layer"]: s for s in info["sites"]}
        for b in info["blocks"]:
            note = ""
            if b["index"] in sites:
                s = sites[b["index"]]
                params = ", ".join(f"{k}={v}" for k, v in s.get("params", {}).items())
                note = f"   <- {s['method']}({params}) -> {s['tokens_out']} tokens"
            lines.append(
                f"           {b['index']:>2} {b['name']:<20} {b['tokens_baseline']:>5} -> {b['tokens_model']:<5}{note}"
            )
    macs = info["macs"]
    lines.append(
        f"MACs       {macs['model'] / 1e9:.3f} G per sample (baseline {macs['baseline'] / 1e9:.3f} G, "
        f"MAC-limit speedup {macs['limit_speedup']:.3f}x)"
    )
    lint = info["lint"]
    lines.append(
        f"lint       {lint['target']}: {'OK' if lint['ok'] else 'FAILED'} "
        f"({lint['errors']} errors, {lint['warnings']} warnings)"
    )
    return "\n".join(lines)
