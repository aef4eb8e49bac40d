"""MLLM artifacts at edge scale: start-up, prefill, decode per token and peak RSS of tokensieve on ONNX Runtime
next to Hugging Face eager (sdpa, full cache), on the same random-weight model and prompt.

The model is a LLaVA preset (default ``llava-1.5-7b-shapes``: LLaVA-1.5-7B layer shapes, 2 vision and 2 text
layers, ~2.8 GB of float32 weights). Set-up, once, in ``--work``: the Hugging Face checkpoint the preset builds
(``save_pretrained``), one tokensieve artifact per method (same weights), and the prompt: BOS, the image's placeholders
(576) and random text ids up to ``--prompt-tokens``, with one random image. Then ``--rounds`` rounds; in each
round every variant runs once, in its own fresh process (so start-up and peak RSS are its own), in the listed order:

* start-up: Hugging Face ``from_pretrained`` of the checkpoint; tokensieve ``load`` + the runner (every session);
* prefill: the first forward (vision tower included) / the vision graph + prefill graph;
* decode: mean milliseconds per new token over ``--new-tokens`` greedy tokens;
* peak RSS: the process's maximum resident set (Linux ``VmHWM``), against the weights file's size.

Ratios to Hugging Face are taken per round and their medians reported; greedy tokens of the unreduced artifact are
compared with Hugging Face's. Writes ``benchmarks/results/llava_memory.json`` and ``llava_memory.png``.

    python benchmarks/bench_llava_memory.py [--work DIR] [--rounds 3] [--methods none "snapkv(budget=256, window=32)"]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
METHODS = ["none", "snapkv(budget=256, window=32)", "h2o(budget=256)", "streamingllm"]


def peak_rss_gib() -> float:
    """This process's peak resident set (``VmHWM``: ``ru_maxrss`` would keep the parent's peak across exec)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 2**20


def prepare(args: argparse.Namespace, work: Path) -> None:
    """The checkpoint, the artifacts and the prompt, unless ``work`` has them already."""
    import tokensieve
    from tokensieve.converters.families import build_mllm
    from tokensieve.runtimes.llava_image import crop_tokens

    if not (work / "hf" / "config.json").is_file():
        build_mllm(args.source, seed=0).model.save_pretrained(work / "hf")
    capacity = args.prompt_tokens + args.new_tokens
    for method in args.methods:
        out = work / _slug(method)
        if not (out / "manifest.json").is_file():
            slots = {"streamingllm": args.ring, "h2o": None}.get(method.split("(")[0], capacity)  # H2O: budget + 1
            tokensieve.export(f"hf:{args.source}", out=out, method=None if method == "none" else method, capacity=slots)
    if not (work / "prompt.npz").is_file():
        artifact = tokensieve.load(work / _slug(args.methods[0]))
        host = artifact.manifest.host
        rng = np.random.default_rng(0)
        image_tokens = crop_tokens(host)
        text = rng.integers(10, artifact.manifest.decoder["vocab"], args.prompt_tokens - 1 - image_tokens)
        ids = np.concatenate([[host["bos_id"]], np.full(image_tokens, host["image_token_id"]), text]).astype(np.int64)
        image = (rng.random((host["image_size"], host["image_size"], 3)) * 255).astype(np.uint8)
        np.savez(work / "prompt.npz", ids=ids, image=image)


def _slug(method: str) -> str:
    return "ts_" + "".join(c if c.isalnum() else "_" for c in method).strip("_")


def child_hf(work: Path, new_tokens: int, threads: int) -> dict:
    import torch
    from transformers import LlavaForConditionalGeneration

    from tokensieve.runtimes.image_families import preprocess

    torch.set_num_threads(threads)
    prompt = np.load(work / "prompt.npz")
    start = time.perf_counter()
    model = LlavaForConditionalGeneration.from_pretrained(work / "hf", dtype=torch.float32, attn_implementation="sdpa")
    startup = time.perf_counter() - start
    host = json.loads((work / _slug("none") / "manifest.json").read_text())["host"]
    pixels = torch.from_numpy(preprocess(prompt["image"], host)[0])
    ids = torch.from_numpy(prompt["ids"])[None]
    with torch.no_grad():
        start = time.perf_counter()
        out = model(input_ids=ids, pixel_values=pixels, use_cache=True)
        prefill = time.perf_counter() - start
        tokens = [int(out.logits[0, -1].argmax())]
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            out = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
            tokens.append(int(out.logits[0, -1].argmax()))
        decode = (time.perf_counter() - start) / max(new_tokens - 1, 1)
    return {"startup_s": startup, "prefill_s": prefill, "decode_ms": decode * 1e3, "ids": tokens}


def child_tokensieve(work: Path, method: str, new_tokens: int, threads: int) -> dict:
    import tokensieve
    from tokensieve.runtimes.llava import LlavaRunner

    prompt = np.load(work / "prompt.npz")
    start = time.perf_counter()
    runner = LlavaRunner.from_artifact(tokensieve.load(work / _slug(method)), threads=threads)
    startup = time.perf_counter() - start
    result = runner.generate(prompt["image"], input_ids=prompt["ids"], max_new_tokens=new_tokens, ignore_eos=True)
    timings = result.timings_ms
    prefill = (timings.get("vision", 0.0) + timings["prefill"]) / 1e3
    return {"startup_s": startup, "prefill_s": prefill, "decode_ms": timings["decode_per_token"], "ids": result.ids}


def run_child(args: argparse.Namespace, variant: str) -> dict:
    command = [sys.executable, __file__, "--child", variant, "--work", str(args.work)]
    command += ["--new-tokens", str(args.new_tokens), "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{variant} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(rounds: list[dict[str, dict]], weights_gib: float) -> dict:
    """Per variant: medians of its figures and of its per-round ratios to Hugging Face."""
    summary = {}
    for variant in rounds[0]:
        rows = [r[variant] for r in rounds]
        med = {key: statistics.median(row[key] for row in rows) for key in ("startup_s", "prefill_s", "decode_ms")}
        med["peak_rss_gib"] = statistics.median(row["peak_rss_gib"] for row in rows)
        med["rss_over_weights"] = med["peak_rss_gib"] / weights_gib
        for key in ("startup_s", "prefill_s", "decode_ms"):
            med[f"{key}_vs_hf"] = statistics.median(r[variant][key] / r["hf"][key] for r in rounds)
        med["same_tokens_as_hf"] = all(r[variant]["ids"] == r["hf"]["ids"] for r in rounds)  # unreduced: must be
        summary[variant] = med
    return summary


def plot(summary: dict, path: Path) -> None:
    from tokensieve.bench.image import pyplot, save_figure

    plt = pyplot()
    if plt is None:
        return
    names = list(summary)
    keys = [("startup_s", "start-up s"), ("prefill_s", "prefill s"), ("decode_ms", "decode ms/token"),
            ("peak_rss_gib", "peak RSS GiB")]  # fmt: skip
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.8))
    for ax, (key, label) in zip(axes, keys, strict=True):
        ax.barh(names, [summary[n][key] for n in names], color=["#888"] + ["#2a7"] * (len(names) - 1))
        ax.set_title(label)
        ax.invert_yaxis()
    fig.tight_layout()
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="llava-1.5-7b-shapes")
    parser.add_argument("--work", type=Path, default=Path("/tmp/tokensieve_bench_memory"))
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ring", type=int, default=512, help="StreamingLLM's cache slots")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        figures = (
            child_hf(args.work, args.new_tokens, args.threads)
            if args.child == "hf"
            else child_tokensieve(args.work, args.child, args.new_tokens, args.threads)
        )
        print(json.dumps({**figures, "peak_rss_gib": peak_rss_gib()}))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    prepare(args, args.work)
    rounds = []
    for index in range(args.rounds):
        rounds.append({variant: run_child(args, variant) for variant in ["hf", *args.methods]})
        print(f"round {index + 1}: " + json.dumps({v: round(r["prefill_s"], 2) for v, r in rounds[-1].items()}))
    weights_gib = (args.work / _slug(args.methods[0]) / "weights.data").stat().st_size / 2**30
    summary = summarise(rounds, weights_gib)
    for variant, row in summary.items():
        print(
            f"{variant:<34} "
            + "  ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())
        )
    RESULTS.mkdir(exist_ok=True)
    record = {"date": time.strftime("%Y-%m-%d"), "source": args.source, "threads": args.threads,
              "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "weights_gib": weights_gib,
              "summary": summary, "rounds": rounds}  # fmt: skip
    (RESULTS / "llava_memory.json").write_text(json.dumps(record, indent=2))
    plot(summary, RESULTS / "llava_memory.png")


if __name__ == "__main__":
    main()
