"""Zoo sweep: every ViT-style timm family and the Hugging Face vision towers x {top-k, ToMe, ATP}.

Not part of the test run. For each (family, method) pair: export with the method inside the graph, run parity
against eager PyTorch (random weights, batch 2), lint for TensorRT 10.3. Writes
``benchmarks/results/zoo_sweep.json`` and the table ``docs/zoo.md``.

Which timm models count (decided on the instantiated module, on the meta device, never on a list of names): the
model has a ``blocks`` ``ModuleList``/``Sequential`` of at least one block; every block has an ``attn`` module
with a ``qkv`` linear layer or separate ``q``/``k``/``v`` (or ``q_proj``/``k_proj``/``v_proj``) linear layers;
and every block's attention reads the same width (a single-stage, isotropic stack: multi-stage models such as
Hiera, whose width changes between stages, are left out). A family is timm's module plus the model name with
its size words, patch size and resolution removed (``vit_small_patch16_224`` -> ``vision_transformer:vit``,
``vit_base_patch16_clip_224`` -> ``vision_transformer:vit_clip``); its smallest member (fewest parameters) runs,
cut to ``depth=3`` and the smallest image the constructor accepts that gives at least a 6x6 grid of tokens (hybrid
and convolutional stems count their real stride, not the embedding's nominal patch size). ToMe's ``r`` is at most
half the patch tokens.

    python benchmarks/zoo_sweep.py [--limit N] [--families a,b] [--methods topk,tome,atp] [--pair-timeout 120]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CANDIDATES = RESULTS / "zoo_candidates.json"
DOC = ROOT / "docs" / "zoo.md"
METHODS = {
    "topk": "topk(keep=0.7, layers=[1])",
    "tome": "tome(r=4)",
    "atp": "atp(threshold=0.5, layers=[1])",
}
GRID = 6  # patches per side of the swept image
DEPTH = 3
SIZE_WORD = re.compile(
    r"^(tiny|small|base|large|huge|giant|gigantic|medium|mediumd|so\d+m\d*|pwee|pnano|wee|little|betwixt|"
    r"xsmall|nano|micro|mini|xx?s\d*|s\d*|m\d*|b\d*|l\d*|h\d*|g\d*|xl\d*|\d+[bm]?|p\d+|patch\d+|\d+x\d+)$"
)


def family_key(name: str, module: str) -> str:
    """``module:name`` without size words, patch sizes, resolutions; ``reg4`` -> ``reg``."""
    words = [re.sub(r"^reg\d+$", "reg", w) for w in name.split("_") if not SIZE_WORD.match(w)]
    return f"{module}:{'_'.join(words) or name}"


def is_vit_style(model: Any) -> bool:
    """The documented rule: isotropic ``blocks`` whose ``attn`` has qkv or q/k/v linear projections."""
    import torch.nn as nn

    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0:
        return False
    widths = set()
    for block in blocks:
        attn = getattr(block, "attn", None)
        if attn is None:
            return False
        projections = [getattr(attn, "qkv", None)]
        for names in (("q", "k", "v"), ("q_proj", "k_proj", "v_proj")):
            if all(isinstance(getattr(attn, n, None), nn.Linear) for n in names):
                projections = [getattr(attn, names[0])]
        if not isinstance(projections[0], nn.Linear):
            return False
        widths.add(projections[0].in_features)
    return len(widths) == 1


def enumerate_timm() -> list[dict[str, Any]]:
    """Every timm model, instantiated on the meta device: name, module, family, parameters, ViT-style or not."""
    import timm
    import torch
    from timm.models import _registry
    from tqdm import tqdm

    rows = []
    for name in tqdm(timm.list_models(), desc="enumerate timm", file=sys.stderr):
        module = _registry._model_to_module.get(name, "?")
        row: dict[str, Any] = {"name": name, "module": module, "family": family_key(name, module)}
        try:
            with warnings.catch_warnings(), torch.device("meta"):
                warnings.simplefilter("ignore")
                model = timm.create_model(name, pretrained=False)
        except Exception as e:
            rows.append({**row, "vit_style": False, "error": f"{type(e).__name__}: {e}".splitlines()[0]})
            continue
        rows.append({**row, "vit_style": is_vit_style(model), "params": sum(p.numel() for p in model.parameters())})
    return rows


def timm_families(refresh: bool) -> dict[str, dict[str, Any]]:
    """Family -> its smallest ViT-style member (candidates cached in ``zoo_candidates.json``)."""
    if refresh or not CANDIDATES.exists():
        CANDIDATES.write_text(json.dumps(enumerate_timm(), indent=1) + "\n")
    rows = json.loads(CANDIDATES.read_text())
    families: dict[str, dict[str, Any]] = {}
    for row in rows:
        if not row["vit_style"]:
            continue
        best = families.get(row["family"])
        if best is None or (row["params"], row["name"]) < (best["params"], best["name"]):
            families[row["family"]] = row
    return dict(sorted(families.items()))


def _meta_forward(name: str, options: dict[str, Any]) -> int | None:
    """Build ``name`` with ``options`` on the meta device and run it; the token count, or None if refused."""
    import timm
    import torch

    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            model = timm.create_model(name, pretrained=False, **options).eval()
            size = options.get("img_size", model.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
            channels = model.pretrained_cfg.get("input_size", (3,))[0]
            x = torch.empty(1, channels, size, size)
            tokens = model.patch_embed(x) if hasattr(model, "patch_embed") else None
            model(x)
    except Exception:
        return None
    if isinstance(tokens, (tuple, list)):
        tokens = tokens[0]
    if not isinstance(tokens, torch.Tensor) or tokens.dim() < 3:
        return GRID * GRID
    return int(tokens.shape[1] * tokens.shape[2]) if tokens.dim() == 4 else int(tokens.shape[1])


def timm_options(name: str) -> tuple[dict[str, Any], int]:
    """The smallest options the constructor accepts (depth, img_size on the patch grid) and the patch count."""
    import timm
    import torch

    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        model = timm.create_model(name, pretrained=False)
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", 16)
    patch = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
    sizes = [GRID * patch, 64, 96, 112, 128, 192, 224]
    for depth in ({"depth": DEPTH}, {}):
        accepted = []
        for size in [*({"img_size": s} for s in sizes), {}]:
            tokens = _meta_forward(name, {**depth, **size})
            if tokens is not None and tokens >= GRID * GRID:
                return {**depth, **size}, tokens
            if tokens is not None:
                accepted.append(({**depth, **size}, tokens))
        if accepted:  # no size reaches the grid: the one with the most tokens
            return max(accepted, key=lambda a: a[1])
    return {}, GRID * GRID


def method_for(key: str, tokens: int) -> str:
    """The swept method string for a model of ``tokens`` patch tokens: ToMe's ``r`` at most half of them (what one
    block can merge), so a model with few tokens gets a legal strength rather than a refusal."""
    if key == "tome" and tokens >= 2:
        return f"tome(r={min(4, tokens // 2)})"
    return METHODS[key]


def _hf(model_type: str, **extra: Any) -> dict[str, Any]:
    base = {
        "model_type": model_type,
        "hidden_size": 64,
        "num_hidden_layers": DEPTH,
        "num_attention_heads": 2,
        "intermediate_size": 128,
        "image_size": GRID * 16,
        "patch_size": 16,
    }
    return {**base, **extra}


# Tiny configs of the Hugging Face vision towers (random weights; ``hf:PATH`` to a config.json).
HF_TOWERS: dict[str, dict[str, Any]] = {
    "hf:vit": _hf("vit"),
    "hf:deit": _hf("deit"),
    "hf:clip": _hf("clip_vision_model"),
    "hf:siglip": _hf("siglip_vision_model"),
    "hf:siglip2": _hf("siglip2_vision_model", num_patches=GRID * GRID),
    "hf:dinov2": _hf("dinov2", mlp_ratio=2),
    "hf:dinov2_registers": _hf("dinov2_with_registers", mlp_ratio=2, num_register_tokens=4),
    "hf:dinov3": _hf("dinov3_vit", num_register_tokens=4),
    "hf:aimv2": _hf("aimv2_vision_model"),
    "hf:beit": _hf("beit", use_relative_position_bias=True),
    "hf:data2vec_vision": _hf("data2vec-vision", use_relative_position_bias=True),
    "hf:ijepa": _hf("ijepa"),
}


class PairTimeout(Exception):
    """The pair ran past ``--pair-timeout``."""


def _on_alarm(signum: int, frame: Any) -> None:
    raise PairTimeout


def _first_failure(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    bad = [line for line in lines[1:] if not line.endswith(" ok") and "PASS" not in line]
    return (bad or lines or ["(no text)"])[0][:200]


def run_pair(source: str, method: str, tokens: int, out: Path, timeout: int) -> dict[str, Any]:
    """Export, parity, lint one pair; the status and its reason. Never raises."""
    import tokensieve
    from tokensieve.errors import TokensieveError

    kwargs: dict[str, Any] = {"batch": 2}
    if method.startswith("atp"):
        kwargs["buckets"] = sorted({max(1, tokens * i // 4) for i in range(1, 5)})
    start = time.perf_counter()
    row: dict[str, Any] = {"source": source, "method": method}
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(timeout)
    try:
        artifact = tokensieve.export(source, method, out, **kwargs)
        parity = artifact.parity()
        lint = artifact.lint("trt10.3")
        if not parity.ok:
            row.update(status="parity-fail", reason=_first_failure(parity.text()))
        elif not lint.ok:
            row.update(status="lint-fail", reason=_first_failure(lint.text()))
        else:
            row.update(status="pass", reason="")
    except PairTimeout:
        row.update(status="timeout", reason=f"over {timeout} s")
    except TokensieveError as e:
        row.update(status="refused", reason=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
    except Exception as e:
        row.update(status="crash", reason=f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}")
    finally:
        signal.alarm(0)
    row["seconds"] = round(time.perf_counter() - start, 2)
    row["left_behind"] = row["status"] in ("refused", "crash", "timeout") and out.exists()
    shutil.rmtree(out, ignore_errors=True)
    return row


def worker(job: dict[str, Any]) -> None:
    """One family in its own process: one JSON line per method on stdout."""
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory(prefix="zoo_") as tmp:
        source, tokens = job["source"], job["tokens"]
        if job.get("hf_config"):
            config = Path(tmp) / "config.json"
            config.write_text(json.dumps(job["hf_config"]))
            source = f"hf:{config}"
        for key in job["methods"]:
            row = run_pair(source, method_for(key, tokens), tokens, Path(tmp) / key, job["timeout"])
            row.update(family=job["family"], model=job["model"], key=key, source=job["source"])
            print(json.dumps(row), flush=True)


def timm_job(family: str, row: dict[str, Any], methods: list[str], timeout: int) -> dict[str, Any]:
    options, tokens = timm_options(row["name"])
    query = "&".join(f"{k}={v}" for k, v in options.items())
    source = f"timm:{row['name']}" + (f"?{query}" if query else "")
    return {
        "family": family,
        "model": row["name"],
        "source": source,
        "tokens": tokens,
        "methods": methods,
        "timeout": timeout,
    }


def run_job(job: dict[str, Any]) -> list[dict[str, Any]]:
    """Run one family's job in a subprocess; pairs it never reported are recorded as timeouts."""
    limit = job["timeout"] * len(job["methods"]) + 120
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, __file__, "--worker", json.dumps(job)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        stdout, stderr = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
    rows = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    done = {r["key"] for r in rows}
    tail = (stderr.strip().splitlines() or ["no output"])[-1][:300]
    for key in job["methods"]:
        if key not in done:
            status = "timeout" if proc.returncode in (None, -9) else "crash"
            reason = f"worker process ended ({proc.returncode}): {tail}"
            rows.append(
                {
                    "family": job["family"],
                    "model": job["model"],
                    "key": key,
                    "source": job["source"],
                    "method": method_for(key, job["tokens"]),
                    "status": status,
                    "reason": reason,
                    "seconds": None,
                    "left_behind": False,
                }
            )
    return rows


def _table_reason(row: dict[str, Any]) -> str:
    reason = row["reason"].replace("|", "\\|").replace("\n", " ")
    if row.get("left_behind"):
        reason += " **(output directory left behind)**"
    return reason


def _rate(rows: list[dict[str, Any]]) -> str:
    passed = sum(r["status"] == "pass" for r in rows)
    return f"{passed}/{len(rows)} ({100 * passed / max(1, len(rows)):.0f} %)"


def render(results: dict[str, Any]) -> str:
    """The markdown table: pass rate overall and per method, then one row per family x method."""
    rows = results["pairs"]
    lines = [
        "# Zoo sweep",
        "",
        f"Run {results['date']} on {results['machine']}; generated by `benchmarks/zoo_sweep.py` (raw figures in",
        "`benchmarks/results/zoo_sweep.json`). Random weights, batch 2, reduced depth and a small image (the source",
        "column shows the options each model was built with), parity against eager PyTorch, lint for TensorRT 10.3.",
        "Methods: "
        + ", ".join(f"`{m}`" for m in METHODS.values())
        + " (ToMe's r at most half the patch tokens; ATP with four buckets up to the patch count).",
        "",
        "Which timm models are swept: those whose instantiated module has an isotropic `blocks` stack where every",
        "block's `attn` holds a `qkv` (or `q`/`k`/`v`) linear projection; one family per timm module and model name",
        "without its size, patch and resolution words; its smallest member (fewest parameters) runs.",
        f"{results['timm_families']} timm families, {len(HF_TOWERS)} Hugging Face towers; not covered: "
        + (results.get("not_covered") or "nothing")
        + ".",
        "",
        f"**Pass rate: {_rate(rows)}** of family x method pairs.",
        "",
        "| method | pass | refused | parity-fail | lint-fail | crash | timeout |",
        "|---|---|---|---|---|---|---|",
    ]
    for key in METHODS:
        subset = [r for r in rows if r["key"] == key]
        kinds = ("refused", "parity-fail", "lint-fail", "crash", "timeout")
        counts = [sum(r["status"] == s for r in subset) for s in kinds]
        lines.append(f"| {key} | {_rate(subset)} | " + " | ".join(map(str, counts)) + " |")
    statuses = sorted({r["status"] for r in rows})
    lines += [
        "",
        "Statuses seen: " + ", ".join(statuses) + ".",
        "",
        "| family | model (source) | method | status | s | reason |",
        "|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["family"], list(METHODS).index(r["key"]))):
        seconds = "" if r["seconds"] is None else f"{r['seconds']:.0f}"
        cells = [r["family"], f"`{r['source']}`", r["key"], r["status"], seconds, _table_reason(r)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def build_jobs(args: argparse.Namespace) -> tuple[list[dict[str, Any]], int]:
    methods = args.methods.split(",")
    families = timm_families(args.refresh)
    wanted = set(args.families.split(",")) if args.families else None
    jobs = []
    for family, row in HF_TOWERS.items():
        if wanted is None or family in wanted:
            jobs.append(
                {
                    "family": family,
                    "model": family,
                    "source": family,
                    "tokens": GRID * GRID,
                    "methods": methods,
                    "timeout": args.pair_timeout,
                    "hf_config": row,
                }
            )
    selected = [(f, r) for f, r in families.items() if wanted is None or f in wanted or r["name"] in wanted]
    if args.limit:
        selected = selected[: args.limit]
    for family, row in selected:
        jobs.append({"family": family, "model": row["name"], "methods": methods, "timeout": args.pair_timeout})
    return jobs, len(families)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=0, help="run the first N timm families only")
    parser.add_argument("--families", default="", help="comma-separated families (or model names) to run")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--pair-timeout", type=int, default=120, help="seconds per pair before 'timeout'")
    parser.add_argument("--refresh", action="store_true", help="re-enumerate timm (else the cached candidates)")
    parser.add_argument("--resume", action="store_true", help="keep pairs already in the results JSON")
    parser.add_argument("--render", action="store_true", help="only rewrite docs/zoo.md from the results JSON")
    parser.add_argument("--not-covered", default="", help="a sentence for the table on what was not run")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))
    out = RESULTS / "zoo_sweep.json"
    if args.render:
        DOC.write_text(render(json.loads(out.read_text())))
        return None
    sweep(args, out)
    return None


def sweep(args: argparse.Namespace, out: Path) -> None:
    from tqdm import tqdm

    RESULTS.mkdir(exist_ok=True)
    jobs, count = build_jobs(args)
    old = json.loads(out.read_text())["pairs"] if args.resume and out.exists() else []
    done = {(r["family"], r["key"]) for r in old}
    results = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{os.cpu_count()}-core {platform.machine()} CPU, ONNX Runtime CPU",
        "methods": METHODS,
        "timm_families": count,
        "not_covered": args.not_covered,
        "pairs": old,
    }
    for job in tqdm(jobs, desc="zoo sweep", file=sys.stderr):
        job["methods"] = [k for k in job["methods"] if (job["family"], k) not in done]
        if not job["methods"]:
            continue
        if "source" not in job:
            job = timm_job(job["family"], {"name": job["model"]}, job["methods"], job["timeout"])
        for row in run_job(job):
            results["pairs"].append(row)
            tqdm.write(f"{row['family']:45s} {row['key']:5s} {row['status']:12s} {row['reason'][:90]}", file=sys.stderr)
        out.write_text(json.dumps(results, indent=1) + "\n")
    DOC.write_text(render(results))


if __name__ == "__main__":
    main()
