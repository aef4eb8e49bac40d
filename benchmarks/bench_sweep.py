"""Method-strength sweeps on real photos: ToMe, top-k and ATP on a timm ViT, FastV / SnapKV / H2O on an LLaVA preset.

Each sweep exports every strength, evaluates it against the unreduced model (:mod:`tokensieve.evaluate`) and times
it (:func:`tokensieve.evaluate.sweep.sweep`). The photos are crops of the photographs matplotlib ships as sample
data (:func:`tokensieve.calibration.data.sample_images`), written to ``benchmarks/data/photos/``; the LLaVA prompts
are ``benchmarks/data/prompts.jsonl`` (both created on the first run and committed). Weights are seeded random
(no download): the figures show how far each strength moves the model from its unreduced self, not task accuracy.

Writes ``benchmarks/results/sweep_<name>.json`` and ``.png`` per sweep (the chart also to ``docs/img/``, where
docs/benchmarks.md shows it) and prints a markdown table.

    python benchmarks/bench_sweep.py [--vit timm:vit_tiny_patch16_224] [--img-size 112] [--llava hf:llava-tiny]
        [--only tome topk atp fastv snapkv h2o]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import tokensieve
from tokensieve.calibration.data import sample_images

ROOT = Path(__file__).resolve().parent
DATA, RESULTS = ROOT / "data", ROOT / "results"
DOCS_IMG = ROOT.parent / "docs" / "img"
PROMPTS = [
    ("What is in this picture?", None),
    ("Describe the colours of the image.", None),
    ("Is this a photograph or a map?", "photograph"),
    ("How many people are there?", "one"),
    ("What is the main object?", None),
    ("Where was this taken?", None),
]
STORY = (
    "The harbour town woke early. Fishing boats slid out past the breakwater while the bakery on the square lit its "
    "ovens, and the ferry from the island sounded its horn twice as it turned into the channel. "
)
TEXT = [  # long text prompts with a given continuation: the KV-cache methods' perplexity
    (STORY * 2 + "Summarise the morning in one sentence.", "Boats left, bread baked and the ferry arrived."),
    (STORY + "What sounded twice?", "The ferry's horn sounded twice as it turned into the channel."),
]


def photos(count: int = 6) -> Path:
    """``benchmarks/data/photos/`` (created once) and the prompts JSONL next to it (image questions, and long text
    prompts with a continuation whose perplexity the KV-cache methods change)."""
    folder = DATA / "photos"
    if not folder.is_dir():
        folder.mkdir(parents=True)
        for i, image in enumerate(sample_images(count, seed=11, size=160)):
            image.save(folder / f"photo_{i}.jpg", quality=85)
    lines = [
        {"image": f"photos/photo_{i}.jpg", "prompt": prompt, **({"answer": answer} if answer else {})}
        for i, (prompt, answer) in enumerate(PROMPTS[:count])
    ]
    lines += [{"prompt": prompt, "continuation": continuation} for prompt, continuation in TEXT]
    (DATA / "prompts.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder


def sweeps(args: argparse.Namespace, images: Path) -> dict[str, tuple[str, str, dict]]:
    """name -> (source, grid, options)."""
    vit = {"img_size": args.img_size}
    return {
        "tome": (args.vit, "tome(r=[2, 4, 8])", vit),
        "topk": (args.vit, "topk(keep=[0.3, 0.5, 0.7], layers=[3, 6, 9])", vit),
        "atp": (
            args.vit,
            "atp(layers=[3], threshold=[0.5, 1.0, 1.5])",
            {**vit, "buckets": "auto", "calibrate": images},
        ),
        "fastv": (args.llava, "fastv(k=1, keep=[0.25, 0.5, 0.75])", {}),
        "snapkv": (args.llava, "snapkv(budget=[16, 32, 64], window=8)", {}),
        "h2o": (args.llava, "h2o(budget=[16, 32, 64], recent=8)", {}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vit", default="timm:vit_tiny_patch16_224")
    parser.add_argument("--img-size", type=int, default=112)
    parser.add_argument("--llava", default="hf:llava-tiny")
    parser.add_argument("--only", nargs="+", help="run only these sweeps")
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--blocks", type=int, default=6, help="image models: alternating timing blocks")
    parser.add_argument("--per-block", type=int, default=5)
    args = parser.parse_args()
    images = photos()
    RESULTS.mkdir(exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (source, grid, options) in sweeps(args, images).items():
            if args.only and name not in args.only:
                continue
            data = DATA / "prompts.jsonl" if source == args.llava else images
            out = Path(tmp) / name
            timing = {"blocks": args.blocks, "per_block": args.per_block}
            report = tokensieve.sweep(
                source, grid, data, out, new_tokens=args.new_tokens, quiet=False, **timing, **options
            )
            print(report.text(), flush=True)
            (RESULTS / f"sweep_{name}.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
            shutil.copy(out / "sweep.png", RESULTS / f"sweep_{name}.png")
            shutil.copy(out / "sweep.png", DOCS_IMG / f"sweep_{name}.png")
            rows += [(name, report, row) for row in report.rows]
    print(
        "| sweep | strength | task | agreement | perplexity (unreduced) | latency ms | unreduced ms | relative | "
        "MAC-limit relative | Pareto |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, report, r in rows:
        limit = "-" if r.limit_relative is None else f"{r.limit_relative:.3f}"
        ppl, base = r.metrics.get("perplexity"), r.metrics.get("baseline_perplexity")
        perplexity = "-" if ppl is None else f"{ppl:.2f} ({base:.2f})"
        print(
            f"| {name} | {r.label} | {report.task} | {r.agreement:.4f} | {perplexity} | {r.latency_ms:.2f} | "
            f"{r.baseline_ms:.2f} | {r.relative:.3f} | {limit} | {'yes' if r.pareto else ''} |"
        )


if __name__ == "__main__":
    main()
