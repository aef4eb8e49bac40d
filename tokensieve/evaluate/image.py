"""Quality of an image-model artifact (single graph or staged) against its own unreduced ``baseline.onnx``.

The task follows the outputs the manifest records (``--task`` overrides it; a model whose outputs are all maps is
evaluated as ``dense``):

* ``classify``: a ``logits [B, C]`` output -> top-1 agreement with the baseline, mean KL(baseline || model) of the
  softmax, and with labels (an ImageFolder tree) top-1 accuracy of both;
* ``embed``: a pooled ``[B, D]`` output (``pooler_output``) -> cosine of model and baseline features;
* ``dense``: a map -> correlation of model and baseline maps and IoU of their top 10 %: a token map ``[B, N, D]``
  (``last_hidden_state``, ``N`` the tokens entering block 0) by its per-token feature norms, a value map
  ``[B, H, W]`` (DPT's ``predicted_depth``) as it is, a feature map ``[B, C, H, W]`` by its per-pixel channel norms.
  The map must keep the baseline's size: a reduced graph returns fewer tokens unless it was exported with the grid
  restored (``--restore-grid``); without that, evaluate it as ``embed``.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from tokensieve.errors import OptionError
from tokensieve.evaluate.data import class_indices, image_set, load_pixels
from tokensieve.evaluate.report import EvalReport

TASKS = ("classify", "embed", "dense")
TOP_FRACTION = 0.1  # dense: the top 10 % of tokens by feature norm
_DYNAMIC_BATCH = 8


def choose_output(outputs: list[dict[str, Any]], task: str | None) -> tuple[str, str]:
    """``(output name, task)``: the task from the outputs' names and ranks, or the output that ``task`` needs."""
    if task is not None and task not in TASKS:
        raise OptionError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    by_name = {o["name"]: o for o in outputs}
    rank = {o["name"]: len(o["shape"] or ()) for o in outputs}
    if task in (None, "classify") and "logits" in by_name:
        return "logits", "classify"
    if task in (None, "embed") and "pooler_output" in by_name:
        return "pooler_output", "embed"
    if task is None and all(rank[name] >= 3 for name in by_name):
        task = "dense"  # only maps (a depth map, feature maps)
    wanted = {"classify": 2, "embed": 2, "dense": 3, None: 2}[task]
    names = [name for name in by_name if rank[name] == wanted or (task == "dense" and rank[name] == 4)]
    if not names:
        found = ", ".join(f"{o['name']} {o['shape']}" for o in outputs)
        need = "[batch, tokens, features]" if wanted == 3 else "[batch, classes or features]"
        raise OptionError(f"task {task or 'classify/embed'} needs an output {need}; the graph returns {found}")
    return names[0], task or "embed"


def _batches(artifact, count: int) -> int:
    return artifact.manifest.export.get("batch") or min(count, _DYNAMIC_BATCH)


def _runners(artifact):
    """``(model, baseline)``: callables from a pixel batch to the graph's outputs."""
    if artifact.kind == "staged":
        staged = artifact.staged_runner("bucketed", allow_truncation=True, spin=False)
        model = lambda x: staged.run(x).outputs  # noqa: E731
    else:
        single = artifact.runner("model", spin=False)
        model = lambda x: single.run({single.input_names[0]: x})  # noqa: E731
    base = artifact.runner("baseline", spin=False)
    return model, lambda x: base.run({base.input_names[0]: x})


def run_both(artifact, images, name: str, quiet: bool) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """The output ``name`` of the artifact and of its baseline over ``images`` (static batches padded by repeating
    the last image), and the mean milliseconds per image of each."""
    from tqdm import tqdm

    pre = artifact.manifest.preprocessing
    batch = _batches(artifact, len(images))
    model, base = _runners(artifact)
    warm = load_pixels(images, 0, 1, pre)
    for run in (model, base):  # warm-up: the first run of a session pays its allocations
        run(np.repeat(warm, batch, axis=0) if artifact.manifest.export.get("batch") else warm)
    outs: dict[str, list[np.ndarray]] = {"model": [], "baseline": []}
    seconds = {"model": 0.0, "baseline": 0.0}
    for start in tqdm(range(0, len(images), batch), desc="eval", unit="batch", disable=quiet, leave=False):
        pixels = load_pixels(images, start, start + batch, pre)
        real = len(pixels)
        if artifact.manifest.export.get("batch") and real < batch:
            pixels = np.concatenate([pixels, np.repeat(pixels[-1:], batch - real, axis=0)])
        for key, run in (("model", model), ("baseline", base)):
            begin = time.perf_counter()
            value = run(pixels)[name]
            seconds[key] += time.perf_counter() - begin
            if isinstance(value, list):
                raise OptionError(f"output {name} has a different token count per image; evaluate task embed")
            outs[key].append(np.asarray(value, np.float64)[:real])
    timings = {f"{key}_per_image": 1e3 * s / len(images) for key, s in seconds.items()}
    return np.concatenate(outs["model"]), np.concatenate(outs["baseline"]), timings


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def classify_metrics(model: np.ndarray, baseline: np.ndarray, labels: np.ndarray | None) -> dict[str, Any]:
    log_p, log_q = _log_softmax(baseline), _log_softmax(model)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(axis=-1)
    out = {
        "agreement": float(np.mean(model.argmax(-1) == baseline.argmax(-1))),
        "metrics": {"logit_kl": float(kl.mean()), "logit_kl_max": float(kl.max())},
    }
    if labels is not None:
        out["accuracy"] = float(np.mean(model.argmax(-1) == labels))
        out["baseline_accuracy"] = float(np.mean(baseline.argmax(-1) == labels))
    return out


def embed_metrics(model: np.ndarray, baseline: np.ndarray) -> dict[str, Any]:
    model, baseline = model.reshape(len(model), -1), baseline.reshape(len(baseline), -1)
    norms = np.linalg.norm(model, axis=1) * np.linalg.norm(baseline, axis=1)
    cosine = (model * baseline).sum(axis=1) / np.maximum(norms, 1e-30)
    cosine = np.where((model == baseline).all(axis=1), 1.0, cosine)  # identical features: exactly 1
    return {"agreement": float(cosine.mean()), "metrics": {"cosine_min": float(cosine.min())}}


def value_map(x: np.ndarray, tokens: int | None) -> np.ndarray:
    """``[B, M]``: per-token feature norms of a token map ``[B, tokens, D]``, the values of ``[B, H, W]``, the
    per-pixel channel norms of ``[B, C, H, W]`` (``tokens`` None: every ``[B, N, D]`` is a token map)."""
    if x.ndim == 3 and tokens in (None, x.shape[1]):
        return np.linalg.norm(x, axis=-1)
    return (np.linalg.norm(x, axis=1) if x.ndim == 4 else x).reshape(len(x), -1)


def dense_metrics(model: np.ndarray, baseline: np.ndarray, tokens: int | None = None) -> dict[str, Any]:
    """Mean correlation of the maps (:func:`value_map`; ``tokens``: the token count of a token map) and mean IoU of
    their top 10 % positions."""
    if model.shape != baseline.shape:
        raise OptionError(
            f"the reduced map {list(model.shape[1:])} differs from the baseline's {list(baseline.shape[1:])}: dense "
            "evaluation needs the tokens restored to the full grid; export with --restore-grid on, or use --task embed"
        )
    a, b = value_map(model, tokens), value_map(baseline, tokens)
    top = max(1, round(TOP_FRACTION * a.shape[1]))
    corr, iou = [], []
    for x, y in zip(a, b, strict=True):
        corr.append(1.0 if np.array_equal(x, y) else float(np.corrcoef(x, y)[0, 1]))
        sx, sy = set(np.argsort(-x, kind="stable")[:top]), set(np.argsort(-y, kind="stable")[:top])
        iou.append(len(sx & sy) / len(sx | sy))
    return {"agreement": float(np.mean(corr)), "metrics": {"top10_iou": float(np.mean(iou))}}


def eval_image(
    artifact,
    data,
    task: str | None = None,
    limit: int | None = None,
    quiet: bool = True,
    save: bool = True,
) -> EvalReport:
    """Evaluate ``artifact`` on the images at ``data`` (see :mod:`tokensieve.evaluate.data`) against its baseline;
    with ``save``, write ``eval.json`` into the artifact."""
    manifest = artifact.manifest
    name, task = choose_output(manifest.outputs, task)
    images = image_set(data, manifest.preprocessing, limit)
    shape = next(o["shape"] for o in manifest.outputs if o["name"] == name)
    labels = None
    notes = []
    if images.labels is not None and task == "classify":
        labels = class_indices(images.labels, int(shape[-1]))
    elif images.labels is not None:
        notes.append(f"the data has labels, but task {task} has no classes: accuracy not measured")
    if manifest.graphs["model"] == manifest.graphs["baseline"]:
        notes.append("the artifact has no reduction (method none): it is its own baseline")
    model, baseline, timings = run_both(artifact, images, name, quiet)
    if task == "classify":
        result = classify_metrics(model, baseline, labels)
    else:
        tokens = (manifest.layout or {}).get("tokens")
        result = embed_metrics(model, baseline) if task == "embed" else dense_metrics(model, baseline, tokens)
    report = EvalReport(
        str(artifact.path), "baseline.onnx", manifest.method_text, artifact.kind, task, len(images), **result
    )
    report.timings_ms, report.notes = timings, notes
    if save:
        report.save(artifact.path)
    return report
