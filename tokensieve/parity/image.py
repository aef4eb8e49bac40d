"""Parity: the exported graph (ONNX Runtime) against the eager PyTorch reference of the same method.

Two things must agree on the same inputs:

* **values**: every graph output, ``max |ort - eager| / max |eager|`` (error relative to the output scale) must be
  ``<= tolerance`` (1e-4 by default, fp32);
* **selections**: at every reduction site, the token groupings (kept, merged together, dropped), derived from
  the index tensors the site exposes as debug outputs (``tokensieve/site<k>/kept``, ``.../src``, ``.../dst``, ...),
  must equal the reference's, sample by sample; token sizes of merged groups must agree too. Groupings, not raw
  order, are the criterion (an equal order is reported as well).

The inputs and both sets of outputs are written in Polygraphy's JSON format under ``DIR/golden/`` so the same
check can be replayed on a TensorRT machine (``polygraphy run model.onnx --trt --load-inputs ...``); the eager
reference's site records (kept indices, merge maps, sizes) go to ``golden/eager_sites.npz``. :func:`replay_golden`
repeats the whole check, values and selections, from those files alone: no torch, no eager model (a deployment box
or a registry gate with only ONNX Runtime).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from tokensieve.errors import ParityError
from tokensieve.onnx_file import load_onnx
from tokensieve.parity.report import (
    EAGER,
    ORT,
    ParityReport,
    SiteParity,
    budget,
    compare_outputs,
    output_scale,
    read_golden,
    save_arrays,
    write_golden,
)
from tokensieve.parity.staged import check_staged_parity, replay_staged_golden

SITES = "eager_sites.npz"


def assignment(site: dict, specials: int, raw: dict[str, np.ndarray]) -> np.ndarray:
    """``[B, N_in]``: for each token entering a site, the output position it ends up in (-1 when dropped),
    derived from the index tensors the site exposes (the same roles in the graph and in the eager reference)."""
    S, N, method, params = specials, site["tokens_in"], site["method"], site.get("params", {})
    first = next(iter(raw.values()))
    out = np.full((first.shape[0], N), -1, dtype=np.int64)
    out[:, :S] = np.arange(S)
    rows = np.arange(first.shape[0])[:, None]
    if "kept" in raw:  # a pruning site: the kept positions, in output order after the specials
        kept = raw["kept"]
        out[rows, kept] = S + np.arange(kept.shape[1])
        if site["tokens_out"] > S + kept.shape[1]:  # fused token collects every pruned candidate
            pruned = out[:, S:] == -1
            out[:, S:][pruned] = site["tokens_out"] - 1
    elif method == "tome":
        a_pos = np.array([i for i in range(S, N) if i % 2 == 0])  # even / odd stream positions
        b_pos = np.array([i for i in range(S, N) if i % 2 == 1])
        _bipartite(
            out, np.broadcast_to(a_pos, (len(out), len(a_pos))), np.broadcast_to(b_pos, (len(out), len(b_pos))), raw, S
        )
    elif method == "pitome" and params.get("bsm"):
        order = raw["order"] + S
        _bipartite(out, order[:, 0::2], order[:, 1::2], raw, S)
    elif method == "pitome":
        order, dst, r = raw["order"] + S, raw["dst"], params["r"]
        protected, kept_b = order.shape[1] - 2 * r, S + order.shape[1] - 2 * r
        out[rows, order[:, 2 * r :]] = S + np.arange(protected)
        out[rows, order[:, 1 : 2 * r : 2]] = kept_b + np.arange(r)
        out[rows, order[:, 0 : 2 * r : 2]] = kept_b + dst
    elif method == "diffrate":
        order, prune, merge = raw["order"] + S, params["prune"], params["merge"]
        out[rows, order[:, : merge - S]] = np.arange(S, merge)
        if merge < prune:
            out[rows, order[:, merge - S : prune - S]] = raw["dst"]
    else:
        raise ParityError(f"no assignment rule for method {method!r}")
    return out


def _bipartite(out: np.ndarray, a_pos: np.ndarray, b_pos: np.ndarray, raw: dict[str, np.ndarray], S: int) -> None:
    """Bipartite soft matching's layout ``[specials, unmerged A, B]``: A tokens ``a_pos [B, |A|]`` (positions in
    the input) stay at ``unm`` or merge from ``src`` into B token ``dst``; every B token ``b_pos [B, |B|]`` stays."""
    rows = np.arange(out.shape[0])[:, None]
    unm, src, dst = raw["unm"], raw["src"], raw["dst"]
    out[rows, np.take_along_axis(a_pos, unm, 1)] = S + np.arange(unm.shape[1])
    out[rows, b_pos] = S + unm.shape[1] + np.arange(b_pos.shape[1])
    out[rows, np.take_along_axis(a_pos, src, 1)] = S + unm.shape[1] + dst


def _compose(source: np.ndarray, assign: np.ndarray) -> np.ndarray:
    """Source map after one more site: original token -> output position (-1 dropped)."""
    rows = np.arange(source.shape[0])[:, None]
    return np.where(source >= 0, assign[rows, np.maximum(source, 0)], -1)


def _canonical(source: np.ndarray) -> np.ndarray:
    """Relabel each group of original tokens by its smallest member: an order-free form of a source map."""
    labels = np.full_like(source, -1)
    for b in range(source.shape[0]):
        for group in np.unique(source[b][source[b] >= 0]):
            members = np.nonzero(source[b] == group)[0]
            labels[b, members] = members.min()
    return labels


def _size_error(ref_sizes, got_sizes, ref_source: np.ndarray, got_source: np.ndarray) -> float | None:
    """Largest size difference between the groups (matched through their original tokens) of both sides."""
    if ref_sizes is None or got_sizes is None:
        return None
    worst = 0.0
    for b in range(ref_source.shape[0]):
        for i in np.unique(_canonical(ref_source[b : b + 1])[0]):
            if i >= 0:
                worst = max(worst, abs(float(ref_sizes[b, ref_source[b, i]] - got_sizes[b, got_source[b, i]])))
    return worst


def compare_sites(
    sites: list[dict], specials: int, eager: dict[int, dict[str, np.ndarray]], graph: dict[str, np.ndarray]
) -> list[SiteParity]:
    """Compare, site by site, which *original* tokens each output token stands for (the merge source map, composed
    over all sites so far): a permutation of tokens between two implementations is not a difference, a different
    grouping is. Sizes are compared group by group."""
    out = []
    ref_source = got_source = None
    for site in sites:
        ref = eager[site["layer"]]
        got = {role: graph[name] for role, name in site["exposed"].items() if name in graph}
        ref_assign = assignment(site, specials, {k: v for k, v in ref.items() if k not in ("sizes", "source")})
        got_assign = assignment(site, specials, {k: v for k, v in got.items() if k not in ("sizes", "source")})
        if ref_source is None:
            ref_source = got_source = np.broadcast_to(np.arange(ref_assign.shape[1]), ref_assign.shape)
        same_order = (ref_assign == got_assign).all(axis=1) & (ref_source == got_source).all(axis=1)
        ref_source, got_source = _compose(ref_source, ref_assign), _compose(got_source, got_assign)
        match = _canonical(ref_source) == _canonical(got_source)
        out.append(
            SiteParity(
                site["layer"],
                site["block"],
                site["method"],
                len(ref_assign),
                int(match.all(axis=1).sum()),
                int(same_order.sum()),
                float(match.mean(axis=1).min()),
                _size_error(ref.get("sizes"), got.get("sizes"), ref_source, got_source) if match.all() else None,
                same_source=_same_source(ref, got, "source" in site["exposed"]),
            )
        )
    return out


def _same_source(ref: dict[str, np.ndarray], got: dict[str, np.ndarray], exposed: bool) -> int | None:
    """Samples whose restore source maps (holder of every original token, or its row of dropped tokens) are
    identical on both sides; None where the site exposes none."""
    if not exposed:
        return None
    if "source" not in ref or "source" not in got or ref["source"].shape != got["source"].shape:
        return 0
    return int((ref["source"] == got["source"]).all(axis=1).sum())


def _reference_module(artifact, reference):
    """The eager module: rebuilt from the manifest's source (checked against its weight hash) or given."""
    from tokensieve.converters.sources import BuiltModel, SourceSpec, build_module, parse_source, weights_digest

    if reference is not None:
        if isinstance(reference, BuiltModel):
            return reference
        return build_module(parse_source(reference) if isinstance(reference, str) else reference)
    spec = SourceSpec.from_dict(artifact.manifest.source)
    beside = artifact.manifest.export.get("reference")  # the checkpoint an ONNX file's exporter left beside it
    if spec.kind == "onnx" and beside:
        return build_module(parse_source(beside))
    if spec.kind == "onnx":
        raise ParityError(
            "this artifact was exported from an ONNX file, which has no eager model; pass the PyTorch source it "
            "came from: `tokensieve parity DIR --reference timm:NAME [--weights FILE]`"
        )
    built = build_module(spec)
    expected = artifact.manifest.weights_sha256
    if expected and weights_digest(built.module) != expected:
        raise ParityError(
            f"the eager model rebuilt from {spec.text} does not have the exported weights (hash mismatch: the "
            "weights file changed or torch generates different random weights); re-export, or pass --reference"
        )
    return built


def _quiet_polygraphy() -> None:
    from polygraphy.logger import G_LOGGER

    G_LOGGER.colors = False
    G_LOGGER.module_severity = G_LOGGER.WARNING


def _write_golden(
    directory: Path,
    feeds: dict[str, np.ndarray],
    eager: dict[str, np.ndarray],
    graph: dict[str, np.ndarray],
    records: dict[int, dict[str, np.ndarray]],
) -> Path:
    from polygraphy.comparator import IterationResult, RunResults
    from polygraphy.json import save_json

    def write(folder: Path) -> None:
        save_json([feeds], str(folder / "inputs.json"), description="tokensieve parity inputs")
        for runner, outputs, file in ((EAGER, eager, "eager_outputs.json"), (ORT, graph, "ort_outputs.json")):
            results = RunResults()
            results.append((runner, [IterationResult(outputs, runner_name=runner)]))
            results.save(str(folder / file))
        save_arrays(SITES, {f"{layer}/{role}": v for layer, rec in records.items() for role, v in rec.items()})(folder)

    _quiet_polygraphy()
    return write_golden(directory, write)


def _check_device(torch, device: str) -> None:
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ParityError(f"--device {device!r} is not a torch device; use cpu or cuda (cuda:N)") from None
    if kind != "cuda":
        raise ParityError(f"--device {device!r}: the eager reference runs on cpu or cuda")
    if not torch.cuda.is_available():
        raise ParityError(f"--device {device!r}: torch sees no CUDA GPU on this machine; use --device cpu")


def check_parity(
    artifact,
    *,
    reference=None,
    batch: int | None = None,
    seed: int = 0,
    tolerance: float | None = None,
    golden: bool = True,
    providers: list[str] | None = None,
    device: str = "cpu",
) -> ParityReport:
    """Run the eager reference and the artifact's graph on the same seeded inputs and compare them (``tolerance``:
    of the output scale; default :func:`budget`). ``device="cuda"`` runs the eager reference on the GPU (single-graph
    artifacts; TF32 off, so the reference stays float32)."""
    import torch

    from tokensieve.reference.reduce import ReducedModel

    if device != "cpu":
        _check_device(torch, device)
    manifest = artifact.manifest
    tolerance, required = budget(artifact, tolerance)
    methods = artifact.methods
    built = _reference_module(artifact, reference)
    static_batch = manifest.export["batch"]
    if batch is None:
        batch = static_batch or 2
    elif static_batch and batch != static_batch:
        raise ParityError(f"the graph has a static batch of {static_batch}; cannot check batch {batch}")
    specials = (manifest.layout or {}).get("specials")
    restore = bool(manifest.export.get("restore_grid"))
    eager_model = ReducedModel(built.module, methods, specials, restore) if methods else built.module.eval()
    pixels = torch.randn(batch, *built.input_shape, generator=torch.Generator().manual_seed(seed))
    if artifact.kind == "staged":
        return check_staged_parity(artifact, eager_model, pixels.numpy(), tolerance, providers, golden, required)
    if device != "cpu":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        eager_model = eager_model.to(device)
    with torch.no_grad():
        eager_out = eager_model(pixels.to(device))
    eager_out = [t.cpu().numpy() for t in (eager_out if isinstance(eager_out, (tuple, list)) else (eager_out,))]
    eager_records = (
        {layer: {k: v.cpu().numpy() for k, v in rec.items()} for layer, rec in eager_model.records.items()}
        if methods
        else {}
    )

    feeds = {manifest.inputs[0]["name"]: pixels.numpy()}
    report, graph_out = _check_graph(artifact, feeds, eager_out, eager_records, tolerance, providers, required=required)
    if golden:
        names = [o.name for o in report.outputs]
        directory = _write_golden(
            artifact.path,
            feeds,
            dict(zip(names, eager_out, strict=True)),
            {n: graph_out[n] for n in names},
            eager_records,
        )
        report.golden = str(directory)
        scale = output_scale(eager_out)
        shapes = {name: list(value.shape) for name, value in feeds.items()}
        atol = max(1e-3, tolerance) * scale
        report.replay = polygraphy_replay(str(artifact.graph_path("model")), directory, atol, shapes=shapes)
    return report


def polygraphy_replay(
    model: str, golden, atol: float, engine: bool = False, shapes: dict[str, list[int]] | None = None
) -> str:
    """The ``polygraphy run`` command that replays the golden files in ``golden`` on TensorRT: ``model`` an ONNX
    file (``engine``: a built plan), outputs within the absolute ``atol`` of the recorded eager outputs. For an ONNX
    file, ``shapes`` (the golden inputs' shapes) become the engine's profile: without them Polygraphy sets every
    dynamic axis of its default profile to 1, and a batch of golden images would not fit."""
    kind = " --model-type engine" if engine else ""
    profile = ""
    if shapes and not engine:
        given = " ".join(f"{name}:[{','.join(map(str, shape))}]" for name, shape in shapes.items())
        profile = "".join(f" --trt-{which}-shapes {given}" for which in ("min", "opt", "max"))
    return (
        f"polygraphy run {model}{kind} --trt{profile} --load-inputs {golden}/inputs.json "
        f"--load-outputs {golden}/eager_outputs.json --atol {atol:.4g} --rtol 0"
    )


def _check_graph(
    artifact,
    feeds: dict[str, np.ndarray],
    eager_out: list[np.ndarray],
    eager_records: dict[int, dict[str, np.ndarray]],
    tolerance: float,
    providers: list[str] | None,
    runtime: str = "onnxruntime",
    required: float = 1.0,
) -> tuple[ParityReport, dict[str, np.ndarray]]:
    """Run the artifact's graph (with its site debug outputs) on ``feeds`` and compare it with the eager side. On
    ``runtime="tensorrt"`` the built engine runs and only the outputs are compared (an engine has no debug
    outputs, so the kept tokens are not)."""

    from tokensieve.runtimes.ort import OrtRunner

    manifest = artifact.manifest
    sites = manifest.sites if eager_records and runtime == "onnxruntime" else []
    model_path = artifact.graph_path("model")
    alive = {v.name for node in load_onnx(model_path).graph for v in node.outputs}
    exposed = [name for site in sites for name in site["exposed"].values() if name in alive]
    if runtime == "onnxruntime":
        runner = OrtRunner(model_path, providers=providers, extra_outputs=exposed)
    else:
        runner = artifact.runner("model", runtime=runtime)
    graph_out = runner.run(feeds)
    names = [o["name"] for o in manifest.outputs]
    if len(names) != len(eager_out):
        raise ParityError(f"the graph has {len(names)} outputs but the eager side has {len(eager_out)}")
    specials = (manifest.layout or {}).get("specials") or 0
    report = ParityReport(
        tolerance,
        len(next(iter(feeds.values()))),
        runner.active,
        compare_outputs(names, eager_out, graph_out, tolerance),
        [replace(s, required=required) for s in compare_sites(sites, specials, eager_records, graph_out)],
    )
    return report, graph_out


def _read_vit_golden(golden: Path) -> tuple[dict, Any, dict[int, dict[str, np.ndarray]]]:
    from polygraphy.comparator import RunResults
    from polygraphy.json import load_json

    _quiet_polygraphy()
    feeds = load_json(str(golden / "inputs.json"))[0]
    eager = RunResults.load(str(golden / "eager_outputs.json"))[0][1][0]
    records: dict[int, dict[str, np.ndarray]] = {}
    with np.load(golden / SITES) as data:
        for key in data.files:
            layer, role = key.split("/")
            records.setdefault(int(layer), {})[role] = data[key]
    return dict(feeds), eager, records


def replay_golden(
    artifact, *, tolerance: float | None = None, providers: list[str] | None = None, runtime: str = "onnxruntime"
) -> ParityReport:
    """Repeat the parity check from ``DIR/golden/`` alone (torch-free): the recorded inputs through the graph on
    ONNX Runtime, compared with the recorded eager outputs and, at every site, the recorded eager selections; on
    ``runtime="tensorrt"``, through the engine ``tokensieve build`` wrote, on the outputs only."""
    tolerance, required = budget(artifact, tolerance)
    if artifact.kind == "staged":
        return replay_staged_golden(
            artifact, tolerance=tolerance, providers=providers, required=required, runtime=runtime
        )
    feeds, eager, records = read_golden(artifact, ("inputs.json", "eager_outputs.json", SITES), _read_vit_golden)
    names = [o["name"] for o in artifact.manifest.outputs]
    missing = [n for n in names if n not in eager]
    if missing:
        raise ParityError(f"the golden outputs lack {missing}; rewrite them with `tokensieve parity {artifact.path}`")
    report, _ = _check_graph(
        artifact, feeds, [eager[n] for n in names], records, tolerance, providers, runtime, required
    )
    report.golden, report.reference = str(artifact.path / "golden"), "golden eager outputs"
    return report


def golden_output_scale(artifact) -> float:
    """The largest magnitude in the recorded eager outputs of a single-graph artifact (what tolerances scale by)."""
    _, eager, _ = read_golden(artifact, ("inputs.json", "eager_outputs.json", SITES), _read_vit_golden)
    return output_scale(eager.values())
