"""``tokensieve`` command line: export, inspect, parity, build (TensorRT engines), lint, plan, bench, gate, generate,
eval, sweep.

Exit codes: 0 success; 1 a check failed (parity mismatch, lint errors); 2 bad input or an operation that could
not be carried out (a typed tokensieve error, printed as one line).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tokensieve.errors import (
    ArtifactError,
    InputError,
    OptionError,
    SourceError,
    TokensieveError,
    check_at_least,
)

RUNTIMES = ("onnxruntime", "tensorrt")


def _buckets(text: str | None):
    if text is None or text == "auto":
        return text
    try:
        return [int(t) for t in text.split(",")]
    except ValueError:
        raise TokensieveError(f"--buckets takes 'auto' or comma-separated token counts, got {text!r}") from None


def _export(args: argparse.Namespace) -> int:
    from tokensieve.api import export

    artifact = export(
        args.source,
        args.method,
        args.out,
        weights=args.weights,
        seed=args.seed,
        img_size=args.img_size,
        batch=args.batch,
        dynamic_batch=args.dynamic_batch,
        opset=args.opset,
        exporter=args.exporter,
        specials=args.specials,
        lint_target=args.lint_target,
        buckets=_buckets(args.buckets),
        max_buckets=args.max_buckets,
        calibrate=args.calibrate,
        target_keep=args.target_keep,
        allow_truncation=args.allow_truncation,
        capacity=args.capacity,
        growing_cache=not args.no_growing_cache,
    )
    from tokensieve.inspect.image import format_inspection

    print(format_inspection(artifact.inspect()))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from tokensieve.api import load
    from tokensieve.inspect.image import format_inspection

    info = load(args.dir).inspect()
    print(json.dumps(info, indent=2) if args.json else format_inspection(info))
    return 0


def _parity(args: argparse.Namespace) -> int:
    from tokensieve.api import load

    artifact = load(args.dir)
    if args.runtime != "onnxruntime" and (not args.replay or artifact.kind == "mllm"):
        raise ArtifactError(
            "--runtime tensorrt replays an image model's golden files on its engine: use it with --replay after "
            "`tokensieve parity` and `tokensieve build` (MLLM generation runs on ONNX Runtime)"
        )
    tolerance = {} if args.tolerance is None else {"tolerance": args.tolerance}
    if args.replay:
        kwargs = {"runtime": args.runtime} if artifact.kind != "mllm" else {}
        report = artifact.replay(**tolerance, **kwargs)
    elif artifact.kind == "mllm":
        report = artifact.parity(
            count=args.cases,
            new_tokens=args.new_tokens,
            seed=args.seed,
            golden=not args.no_golden,
            **tolerance,
        )
    else:
        if args.device != "cpu" and "stages" in artifact.manifest:
            raise ArtifactError("--device runs a single-graph artifact's eager reference on the GPU, not a staged one")
        report = artifact.parity(
            reference=_reference(args),
            batch=args.batch,
            seed=args.seed,
            golden=not args.no_golden,
            **tolerance,
            **({"device": args.device} if args.device != "cpu" else {}),
        )
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.text())
    return 0 if report.ok else 1


def _reference(args: argparse.Namespace):
    if not args.reference:
        return None
    from tokensieve.converters.sources import parse_source

    return parse_source(args.reference, weights=args.weights, seed=args.seed)


def _lint(args: argparse.Namespace) -> int:
    from tokensieve.api import load
    from tokensieve.graph_passes.lint import lint
    from tokensieve.graph_passes.propagate import propagate_shapes
    from tokensieve.onnx_file import load_onnx

    path = Path(args.path)
    if path.is_dir():
        report = load(path).lint(args.target)
    else:
        if not path.is_file():
            raise TokensieveError(f"{path} does not exist; pass an .onnx file or an artifact directory")
        model = load_onnx(path, SourceError)
        propagate_shapes(model)
        report = lint(model, args.target)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.text())
    return 0 if report.ok else 1


def _is_mllm(source: str) -> bool:
    """An ``hf:`` LLaVA source or an MLLM artifact directory."""
    from tokensieve.converters.llava import is_mllm_source

    manifest = Path(source) / "manifest.json"
    if manifest.is_file():
        return json.loads(manifest.read_text()).get("kind") == "mllm"
    return source.startswith("hf:") and is_mllm_source(source.removeprefix("hf:"))


def _at_least(low: int):
    """argparse type: an integer of at least ``low`` (the API's :func:`check_at_least` rule)."""

    def parse(text: str) -> int:
        try:
            return check_at_least("value", int(text), low)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        except OptionError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


POSITIVE, NON_NEGATIVE = _at_least(1), _at_least(0)


def _size(text: str) -> tuple[int, int]:
    """``HxW`` -> ``(H, W)``."""
    height, _, width = text.lower().partition("x")
    if not (height.isdigit() and width.isdigit() and int(height) > 0 and int(width) > 0):
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH in pixels such as 672x336, got {text!r}")
    return int(height), int(width)


def _plan(args: argparse.Namespace) -> int:
    from tokensieve.plan.image import format_plan, plan, plan_dicts

    mllm = _is_mllm(args.source)
    options = ("text_tokens", "new_tokens", "image_size", "image_tokens", "capacity")
    misplaced = [key for key in (("specials", "img_size") if mllm else options) if getattr(args, key) is not None]
    if misplaced:
        flag = "--" + misplaced[0].replace("_", "-")
        raise SourceError(f"{flag} applies to {'image models' if mllm else 'MLLM sources'}, not to {args.source}")
    if mllm:
        from tokensieve.plan.mllm import format_mllm_plan, mllm_plan_dict, plan_mllm

        given = {key: getattr(args, key) for key in options if getattr(args, key) is not None}
        prompt, rows = plan_mllm(args.source, args.method, **given)
        print(json.dumps(mllm_plan_dict(prompt, rows), indent=2) if args.json else format_mllm_plan(prompt, rows))
        return 0
    rows = plan(args.source, args.method, specials=args.specials, seed=args.seed, img_size=args.img_size)
    print(json.dumps(plan_dicts(rows), indent=2) if args.json else format_plan(rows))
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from tokensieve.api import load
    from tokensieve.exporter.staged import load_data

    source = load(args.dir)
    pre = source.manifest.get("preprocessing")
    if source.kind == "mllm":
        raise ArtifactError(f"{args.dir} is an MLLM artifact; quantize takes an image-model artifact (no MLLM INT8)")
    if pre is None:
        raise ArtifactError(f"{args.dir} records no preprocessing; quantize takes an image-model artifact")
    data = load_data(args.calibrate, pre["shape"], pre["mean"], pre["std"], limit=args.limit)
    artifact = source.quantize(
        data, args.out, calibration=args.calibration, tolerance=args.tolerance, min_agreement=args.min_agreement
    )
    print(f"wrote {artifact.path} (INT8 QDQ, {len(data)} calibration images, lint {artifact.manifest['lint']['ok']})")
    if args.no_parity:
        return 0
    report = artifact.parity(reference=_reference(args))
    print(report.text())
    return 0 if report.ok else 1


def _dims(texts: list[str]) -> dict[str, tuple[int, int, int]]:
    """``--dim AXIS=MIN:OPT:MAX`` options as profile ranges."""
    dims = {}
    for text in texts:
        axis, _, values = text.partition("=")
        parts = values.split(":")
        if not axis or len(parts) != 3 or not all(p.isdigit() for p in parts):
            raise InputError(f"--dim {text!r}: expected AXIS=MIN:OPT:MAX with integers, e.g. sequence=1:640:2048")
        low, opt, high = map(int, parts)
        if not low <= opt <= high:
            raise InputError(f"--dim {text!r}: needs MIN <= OPT <= MAX")
        dims[axis] = (low, opt, high)
    return dims


def _jetson(args: argparse.Namespace) -> int:
    from tokensieve.api import load

    info = load(args.dir).jetson(
        args.out,
        jetpack=args.jetpack,
        fp16=args.fp16,
        max_batch=args.max_batch,
        dims=_dims(args.dim),
        dla=args.dla,
        dla_batch=args.dla_batch,
    )
    print(
        f"wrote {args.out}: {len(info['graphs'])} graph(s) for JetPack {info['jetpack']} (TensorRT "
        f"{info['tensorrt']}, {info['devices']}), {info['lint']['target']} lint clean; on the device run "
        "jetson/build_engines.sh, then jetson/check.sh, from the bundle folder"
    )
    dla = info["dla"]
    if dla:
        print(
            f"DLA core {dla['core']}: {len(dla['graphs'])} graph(s) at batch {dla['batch']} (GPU fallback for the "
            f"layers the DLA lacks); {len(dla['gpu_graphs'])} graph(s) with other symbolic axes on the GPU"
        )
    return 0


def _build(args: argparse.Namespace) -> int:
    from tokensieve.api import load

    report = load(args.dir).build(fp16=args.fp16, max_batch=args.max_batch, dims=_dims(args.dim))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for onnx, engine in report["engines"].items():
            print(f"{onnx} -> {engine['plan']} ({engine['bytes'] / 2**20:.1f} MiB, {engine['seconds']} s)")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from tokensieve.api import load

    artifact = load(args.dir)
    if args.runtime != "onnxruntime" and artifact.kind == "mllm":
        raise ArtifactError("--runtime tensorrt benchmarks an image model's engines (tokensieve build), not an MLLM's")
    kind = "mllm" if artifact.kind == "mllm" else "staged" if "stages" in artifact.manifest else "single"
    for key, applies, what in (
        ("batch", "single", "single-graph"),
        ("data", "staged", "staged (bucketed)"),
        ("contexts", "mllm", "MLLM"),
    ):
        if getattr(args, key) is not None and kind != applies:
            raise ArtifactError(f"--{key} applies to {what} artifacts; {args.dir} is not one")
    if artifact.kind == "mllm":
        report = artifact.bench(
            contexts=args.contexts, threads=args.threads, blocks=args.blocks, per_block=args.per_block
        )
    elif "stages" in artifact.manifest:
        from tokensieve.exporter.staged import load_data

        pre = artifact.manifest["preprocessing"]
        data = load_data(args.data, pre["shape"], pre["mean"], pre["std"]) if args.data else None
        report = artifact.bench(data=data, threads=args.threads, blocks=args.blocks, runtime=args.runtime)
    else:
        report = artifact.bench(
            batches=args.batch,
            threads=args.threads,
            warmup=args.warmup,
            blocks=args.blocks,
            per_block=args.per_block,
            runtime=args.runtime,
        )
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.text())
    print(f"wrote {artifact.path / 'bench.json'}", file=sys.stderr)
    return 0


def _generate(args: argparse.Namespace) -> int:
    from tokensieve.api import load

    runner = load(args.dir).llava_runner(cache=args.cache, threads=args.threads)
    out = runner.generate(
        args.image, args.prompt, args.max_new_tokens, ignore_eos=args.ignore_eos, template=args.template
    )
    if args.json:
        info = {
            "text": out.text,
            "ids": out.ids,
            "stop": out.stop,
            "prompt_tokens": len(out.prompt_ids),
            "image_span": out.image_span,
            "kept_positions": None if out.kept_positions is None else out.kept_positions.tolist(),
            "cut_counts": None if out.cut_positions is None else [len(c) for c in out.cut_positions],
            "kept_image_tokens": None if out.kept_features is None else len(out.kept_features),
            "merged_windows": None if out.merged_windows is None else out.merged_windows.tolist(),
            "key_set": None if out.key_set is None else out.key_set.tolist(),
            "cached_prompt_positions": None if out.cache_positions is None else out.cache_positions.shape[-1],
            "cached_positions_at_end": None if out.retained_positions is None else out.retained_positions.shape[-1],
            "timings_ms": out.timings_ms,
        }
        print(json.dumps(info, indent=2))
    else:
        print(out.text)
        t = out.timings_ms
        kept = "" if out.cut_positions is None else f" (positions kept per cut: {[len(c) for c in out.cut_positions]})"
        if out.kept_features is not None:
            kept = f" (GlobalCom²: {len(out.kept_features)} vision tokens kept)"
        if out.merged_windows is not None:
            kept += f" (MustDrop: {len(out.merged_windows)} windows merged, key set of {len(out.key_set)})"
        if out.cache_positions is not None:
            kept = f" ({out.cache_positions.shape[-1]} prompt positions cached per layer and KV head)"
        if out.retained_positions is not None:
            kept = f" (H2O: {out.retained_positions.shape[-1]} positions cached per layer and KV head at the end)"
        per_token = "-" if t["decode_per_token"] is None else f"{t['decode_per_token']:.2f}"
        print(
            f"[{len(out.ids)} tokens, stop: {out.stop}; prompt {len(out.prompt_ids)} tokens, image span "
            f"{out.image_span}{kept}; vision {t['vision']:.1f} ms, prefill {t['prefill']:.1f} ms, decode "
            f"{per_token} ms/token, {args.cache} cache]",
            file=sys.stderr,
        )
    return 0


def _triton(args: argparse.Namespace) -> int:
    from tokensieve.api import load

    models = load(args.dir).triton(
        args.out, name=args.name, backend=args.backend, max_batch=args.max_batch, kind=args.kind
    )
    print(f"wrote {len(models)} model(s) into {args.out}: {', '.join(models)}")
    print(f"clients call {models[0]!r}; serve with: tritonserver --model-repository {Path(args.out).resolve()}")
    return 0


def _gate(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from tokensieve.artifact.store import atomic_write_text
    from tokensieve.gate import Policy, gate

    policy = Policy.load(args.policy) if args.policy else Policy()
    if args.target:
        policy = replace(policy, target=args.target)
    report = gate(args.paths, policy)
    if args.junit:
        atomic_write_text(Path(args.junit), report.junit())
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.text())
    return 0 if report.ok else 1


def _eval(args: argparse.Namespace) -> int:
    from tokensieve.api import load

    artifact = load(args.dir)
    options = {"task": args.task, "limit": args.limit, "quiet": args.json}
    if artifact.kind == "mllm":
        options["new_tokens"] = args.new_tokens
    report = artifact.eval(args.data, baseline=args.baseline, **options)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.text())
    print(f"wrote {artifact.path / 'eval.json'}", file=sys.stderr)
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from tokensieve.api import sweep

    given = {key: getattr(args, key) for key in ("img_size", "weights", "calibrate", "capacity") if getattr(args, key)}
    if args.buckets:
        given["buckets"] = _buckets(args.buckets)
    report = sweep(
        args.source,
        args.method,
        args.data,
        args.out,
        baseline=args.baseline,
        task=args.task,
        limit=args.limit,
        new_tokens=args.new_tokens,
        threads=args.threads,
        quiet=args.json,
        seed=args.seed,
        **given,
    )
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.text())
    print(f"wrote {Path(args.out) / 'sweep.json'} and sweep.png", file=sys.stderr)
    return 0


def _add_eval_commands(sub) -> None:
    """``eval`` and ``sweep``: quality against the unreduced model, method-strength sweeps."""
    tasks = ["classify", "embed", "dense", "generate"]
    p = sub.add_parser("eval", help="quality against the unreduced model on your data (writes eval.json)")
    p.add_argument("dir")
    p.add_argument("--data", required=True, help="images (folder, ImageFolder tree, .npz) or MLLMs: a JSONL file")
    p.add_argument("--baseline", help="MLLMs: the unreduced artifact (exported with --method none)")
    p.add_argument("--task", choices=tasks, help="override the task read from the outputs")
    p.add_argument("--limit", type=POSITIVE, help="evaluate at most this many images / prompts")
    p.add_argument("--new-tokens", type=POSITIVE, default=16, help="MLLMs: greedy tokens per prompt (default 16)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_eval)

    p = sub.add_parser("sweep", help="export, eval and bench every strength of a method grid; Pareto chart")
    p.add_argument("source", help="timm:NAME, hf:PRESET|hf:PATH, or path/to/model.onnx")
    p.add_argument("--method", required=True, help='a grid with one list argument, e.g. "tome(r=[4,8,12,16])"')
    p.add_argument("--data", required=True, help="images (folder, ImageFolder tree, .npz) or MLLMs: a JSONL file")
    p.add_argument("--out", required=True, help="sweep folder (artifacts, sweep.json, sweep.png), replaced at the end")
    p.add_argument("--baseline", help="MLLMs: an unreduced artifact to compare with (exported otherwise)")
    p.add_argument("--task", choices=tasks, help="override the task read from the outputs")
    p.add_argument("--limit", type=POSITIVE, help="evaluate at most this many images / prompts")
    p.add_argument("--new-tokens", type=POSITIVE, default=16, help="MLLMs: greedy tokens per prompt (default 16)")
    p.add_argument("--threads", type=POSITIVE, default=2)
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--img-size", type=POSITIVE, help="input resolution (default: the model's)")
    p.add_argument("--weights", help="local checkpoint file for a timm model")
    p.add_argument("--buckets", help="adaptive methods: 'auto' (from --calibrate data) or sizes, e.g. 64,96,128")
    p.add_argument("--calibrate", help="adaptive methods: calibration images")
    p.add_argument("--capacity", type=int, help="MLLMs: KV-cache slots of the decode graph")
    p.add_argument("--json", action="store_true", help="print JSON; no progress bars")
    p.set_defaults(func=_sweep)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokensieve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("export", help="export a model to ONNX with token reduction inside the graph")
    p.add_argument("source", help="timm:NAME, hf:PRESET|hf:PATH, or path/to/model.onnx")
    p.add_argument(
        "--method",
        nargs="?",
        const="none",
        default="none",
        help=(
            'e.g. "topk(keep=0.7, layers=[3,6,9])", "tome(r=8)", "atp()"; MLLMs: "fastv(k=2, keep=0.5)", '
            '"atp_llava(layers=[2], offset=0.5)" (LLaVA), "dyvte(layers=[2, 4], threshold=0.1)", '
            '"mustdrop(layers=[2, 6, 10, 14])" (LLaVA), '
            '"globalcom2(retention=0.25)" (LLaVA-NeXT), "streamingllm(sink=4)", "snapkv(budget=256, window=32)", '
            '"a2sf(budget=256)" or "h2o(budget=256, recent=128)"; omitted or "none" exports the unreduced model'
        ),
    )
    p.add_argument("--out", required=True, help="artifact directory to create (replaced atomically if it exists)")
    p.add_argument("--weights", help="local checkpoint file for a timm model (random weights otherwise)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and example input")
    p.add_argument("--img-size", type=POSITIVE, help="input resolution (default: the model's)")
    p.add_argument("--batch", type=POSITIVE, default=1, help="static batch size (default 1)")
    p.add_argument("--dynamic-batch", action="store_true", help="make the batch axis symbolic")
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--exporter", choices=["dynamo", "legacy"], default="dynamo")
    p.add_argument("--specials", type=NON_NEGATIVE, help="override the detected number of leading special tokens")
    p.add_argument("--lint-target", default="trt10.3", help="target recorded in the manifest's lint result")
    p.add_argument("--buckets", help="adaptive methods: 'auto' (from --calibrate data) or sizes, e.g. 64,96,128")
    p.add_argument("--max-buckets", type=POSITIVE, default=6, help="at most this many buckets with --buckets auto")
    p.add_argument("--calibrate", help="calibration data: a folder of images or an .npz of input batches")
    p.add_argument("--target-keep", type=float, help="calibrate atp's threshold to keep this fraction on average")
    p.add_argument(
        "--allow-truncation",
        action="store_true",
        help="let an image with more tokens than the largest bucket run truncated (reported)",
    )
    p.add_argument(
        "--capacity", type=int, help="MLLMs: KV-cache slots of the static decode graph (h2o: budget + 1 by default)"
    )
    p.add_argument("--no-growing-cache", action="store_true", help="MLLMs: skip the growing-cache decode graph")
    p.set_defaults(func=_export)

    p = sub.add_parser("inspect", help="blocks, tokens per block, sites, MACs and lint result of an artifact")
    p.add_argument("dir")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("parity", help="exported graph vs eager PyTorch reference: values and kept tokens")
    p.add_argument("dir")
    p.add_argument("--reference", help="eager source for artifacts exported from an .onnx file (timm:NAME, hf:...)")
    p.add_argument("--weights", help="checkpoint for --reference")
    p.add_argument("--batch", type=POSITIVE, help="batch for dynamic-batch graphs (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--tolerance", type=float, help="max error relative to the output scale (default 1e-4; quantized: its budget)"
    )
    p.add_argument("--no-golden", action="store_true", help="do not write the golden files")
    p.add_argument(
        "--replay",
        action="store_true",
        help="check against the golden files a previous parity run wrote (no torch or eager model needed)",
    )
    p.add_argument("--device", default="cpu", help="where the eager reference runs (cuda: a single-graph image model)")
    p.add_argument("--cases", type=POSITIVE, default=4, help="MLLMs: random prompt/image cases (several aspect ratios)")
    p.add_argument("--new-tokens", type=POSITIVE, default=32, help="MLLMs: greedy tokens compared per case")
    p.add_argument(
        "--runtime", choices=RUNTIMES, default="onnxruntime", help="with --replay: run the engine `build` wrote"
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_parity)

    p = sub.add_parser("quantize", help="INT8 QDQ copy of an image-model artifact (token selection kept float32)")
    p.add_argument("dir")
    p.add_argument("--calibrate", required=True, help="images (folder) or .npz of input batches")
    p.add_argument("--out", required=True, help="the quantized artifact's directory")
    p.add_argument("--calibration", default="minmax", help="minmax, entropy or percentile")
    p.add_argument("--limit", type=POSITIVE, default=64, help="calibration images used (default 64)")
    p.add_argument("--tolerance", type=float, default=0.05, help="drift budget: output error of the output scale")
    p.add_argument(
        "--min-agreement", type=float, default=0.9, help="drift budget: share of tokens in the same kept group"
    )
    p.add_argument("--no-parity", action="store_true", help="do not hold the result to the eager reference")
    p.add_argument("--reference", help="eager source for artifacts exported from an .onnx file (timm:NAME, hf:...)")
    p.add_argument("--weights", help="checkpoint for --reference")
    p.set_defaults(func=_quantize)

    p = sub.add_parser("build", help="TensorRT engines for every graph (needs tensorrt and an NVIDIA GPU)")
    p.add_argument("dir")
    p.add_argument("--fp16", action="store_true", help="TensorRT 10.x FP16 (11.x: convert the ONNX instead)")
    p.add_argument("--max-batch", type=POSITIVE, default=32, help="profile maximum for a dynamic batch axis")
    p.add_argument(
        "--dim", action="append", default=[], metavar="AXIS=MIN:OPT:MAX", help="a symbolic axis' profile range"
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_build)

    p = sub.add_parser("jetson", help="a bundle that builds and checks the engines on a Jetson with trtexec")
    p.add_argument("dir")
    p.add_argument("--out", required=True, help="the bundle: a folder, or a file ending in .tar.gz")
    p.add_argument("--jetpack", default="6.2", help="6.1, 6.2, 7.0, 7.1, 7.2, 7.2.2 (sets TensorRT and the lint)")
    p.add_argument("--fp16", action="store_true", help="trtexec --fp16 (TensorRT 10.x JetPacks)")
    p.add_argument("--max-batch", type=POSITIVE, default=8, help="profile maximum for a dynamic batch axis")
    p.add_argument(
        "--dla", type=NON_NEGATIVE, metavar="CORE", help="build the static graphs for this DLA core (GPU fallback)"
    )
    p.add_argument("--dla-batch", type=POSITIVE, default=1, help="the fixed batch of DLA engines (default 1)")
    p.add_argument(
        "--dim", action="append", default=[], metavar="AXIS=MIN:OPT:MAX", help="a symbolic axis' profile range"
    )
    p.set_defaults(func=_jetson)

    p = sub.add_parser("triton", help="write an artifact into a Triton model repository")
    p.add_argument("dir")
    p.add_argument("--out", required=True, help="the model repository (created if absent; other models stay)")
    p.add_argument("--name", help="model name clients call (default: the artifact folder's name)")
    p.add_argument("--backend", choices=["onnxruntime", "tensorrt"], default="onnxruntime")
    p.add_argument("--max-batch", type=POSITIVE, help="max_batch_size (default 8, or the engines' profile maximum)")
    p.add_argument("--kind", choices=["auto", "gpu", "cpu"], default="auto", help="instance_group kind")
    p.set_defaults(func=_triton)

    p = sub.add_parser("lint", help="TensorRT-compatibility report; exit 1 on errors")
    p.add_argument("path", help="an .onnx file or an artifact directory")
    p.add_argument("--target", default="trt10.3", help="trt10.3 (JetPack 6), trt10, trt11")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_lint)

    p = sub.add_parser("plan", help="MACs of candidate methods before exporting (MLLMs: cache too)")
    p.add_argument("source", help="timm:NAME, hf:..., an .onnx file, or an artifact directory (its baseline)")
    p.add_argument("--method", action="append", required=True, help="a candidate; repeat to compare several")
    p.add_argument("--specials", type=NON_NEGATIVE)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--img-size", type=POSITIVE)
    p.add_argument("--text-tokens", type=NON_NEGATIVE, help="MLLMs: prompt tokens besides the image (default 60)")
    p.add_argument("--new-tokens", type=NON_NEGATIVE, help="MLLMs: tokens generated (default 256)")
    p.add_argument("--image-size", type=_size, help="MLLMs: HxW of the image (LLaVA-NeXT's token count depends on it)")
    p.add_argument("--image-tokens", type=NON_NEGATIVE, help="MLLMs: image tokens (instead of --image-size)")
    p.add_argument("--capacity", type=int, help="MLLMs: StreamingLLM's cache slots (default: the source's capacity)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_plan)

    p = sub.add_parser("bench", help="latency of reduced vs unreduced graph against the MAC-limit speedup")
    p.add_argument("dir")
    p.add_argument("--batch", type=POSITIVE, nargs="+", help="batch sizes (default: static batch, or 1 8)")
    p.add_argument("--threads", type=POSITIVE, default=2)
    p.add_argument("--warmup", type=NON_NEGATIVE, default=5)
    p.add_argument("--blocks", type=POSITIVE, default=6, help="alternating measurement blocks")
    p.add_argument("--per-block", type=POSITIVE, default=5, help="runs per variant per block")
    p.add_argument("--data", help="staged artifacts: images (folder or .npz) to measure over (default: samples)")
    p.add_argument("--contexts", type=POSITIVE, nargs="+", help="MLLMs: context lengths for decode latency")
    p.add_argument("--runtime", choices=RUNTIMES, default="onnxruntime", help="tensorrt: the engines `build` wrote")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_bench)

    p = sub.add_parser("gate", help="registry gate: digests, lint, golden parity replay and budgets; exit 1 on failure")
    p.add_argument("paths", nargs="+", help="artifact directories or registry folders holding artifacts")
    p.add_argument("--policy", help="JSON policy: target, require_golden, tolerance, methods, budgets")
    p.add_argument("--target", help="lint target (overrides the policy's; default trt10.3)")
    p.add_argument("--junit", help="also write a JUnit XML report to this file")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_gate)

    p = sub.add_parser("generate", help="MLLM artifacts: greedy generation from an image and a prompt")
    p.add_argument("dir")
    p.add_argument("--image", help="image file (omit for a text-only prompt)")
    p.add_argument("--prompt", required=True, help="the question; put into the chat template unless it has <image>")
    p.add_argument("--max-new-tokens", type=NON_NEGATIVE, default=32)
    p.add_argument("--cache", choices=["fixed", "growing"], default="fixed", help="decode graph to use")
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    p.add_argument(
        "--template",
        help='chat template; {prompt} is replaced by the prompt (default "USER: <image>\\n{prompt} ASSISTANT:")',
    )
    p.add_argument("--threads", type=POSITIVE, help="ONNX Runtime intra-op threads")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_generate)
    _add_eval_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except TokensieveError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
