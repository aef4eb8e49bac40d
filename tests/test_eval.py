"""``tokensieve eval`` / ``sweep``: quality against the unreduced model for every artifact kind (the committed v1
artifacts and a tiny timm classifier), method grids, the gate's quality budgets, and bad input as typed errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest

import tokensieve
from tokensieve.calibration.data import sample_images
from tokensieve.cli import main
from tokensieve.errors import DataError, MethodSpecError, OptionError
from tokensieve.evaluate.grid import expand_grid
from tokensieve.gate import Policy, gate

V1 = Path(__file__).parent / "data" / "v1"
CLASSIFIER = "timm:vit_tiny_patch16_224"


def _copy(name: str, root: Path) -> Path:
    return Path(shutil.copytree(V1 / name, root / name))


def _negate(graph: Path, output: str) -> None:
    """Damage a graph: its output ``output`` comes out negated (the argmax becomes the argmin)."""
    model = onnx.load(str(graph), load_external_data=False)
    (value,) = [o for o in model.graph.output if o.name == output]
    for node in model.graph.node:
        node.output[:] = [f"{output}_raw" if name == output else name for name in node.output]
    model.graph.node.append(onnx.helper.make_node("Neg", [f"{output}_raw"], [output]))
    onnx.save(model, str(graph))
    assert value.name == output


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("eval_images")
    for i, image in enumerate(sample_images(4, seed=3, size=48)):
        image.save(folder / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory) -> dict[str, Path]:
    """A tiny timm classifier (random weights, 32 px) unreduced and with ToMe."""
    root = tmp_path_factory.mktemp("classifiers")
    for name, method in (("none", "none"), ("tome", "tome(r=2)")):
        tokensieve.export(CLASSIFIER, method, root / name, img_size=32)
    return {"none": root / "none", "tome": root / "tome"}


def _image_folder(images: Path, root: Path, classes: list[str]) -> Path:
    """An ImageFolder tree: image i in the folder ``classes[i]``."""
    for i, (file, label) in enumerate(zip(sorted(images.iterdir()), classes, strict=True)):
        (root / label).mkdir(parents=True, exist_ok=True)
        shutil.copy(file, root / label / f"{i}.png")
    return root


def test_an_unreduced_classifier_agrees_with_itself_exactly(classifiers, images):
    artifact = tokensieve.load(classifiers["none"])
    report = artifact.eval(images)
    assert report.task == "classify" and report.kind == "image" and report.samples == 4
    assert report.agreement == 1.0 and report.metrics["logit_kl"] == 0.0 and report.accuracy is None
    assert json.loads((classifiers["none"] / "eval.json").read_text())["agreement"] == 1.0


def test_a_damaged_graph_reports_a_drop_against_labels(classifiers, images, tmp_path):
    artifact = tokensieve.load(classifiers["tome"])
    pre = artifact.manifest.preprocessing
    from tokensieve.evaluate.data import image_set, load_pixels

    pixels = load_pixels(image_set(images, pre), 0, 4, pre)
    labels = [str(int(artifact.run(x[None], "baseline")["logits"].argmax())) for x in pixels]
    data = _image_folder(images, tmp_path / "labelled", labels)  # labels = the baseline's predictions
    damaged = Path(shutil.copytree(classifiers["tome"], tmp_path / "damaged"))
    _negate(damaged / "model.onnx", "logits")
    report = tokensieve.load(damaged).eval(data)
    assert report.baseline_accuracy == 1.0 and report.accuracy_drop > 0.5 and report.agreement < 0.5
    assert report.metrics["logit_kl"] > 0
    assert main(["eval", str(classifiers["tome"]), "--data", str(data), "--json"]) == 0
    wrong = _image_folder(images, tmp_path / "named", ["cat", "dog", "cat", "dog"])
    with pytest.raises(DataError, match=r"2 class folders .* do not match the classifier's 1000 classes"):
        tokensieve.load(classifiers["tome"]).eval(wrong)


def test_embedding_and_staged_artifacts(images, tmp_path):
    embed = tokensieve.load(_copy("image_topk", tmp_path)).eval(images, limit=3)
    assert embed.task == "embed" and embed.samples == 3 and 0.5 < embed.agreement < 1.0
    with pytest.raises(OptionError, match="restored to the full grid"):
        tokensieve.load(tmp_path / "image_topk").eval(images, task="dense")
    staged = tokensieve.load(_copy("staged_atp", tmp_path)).eval(images)
    assert staged.kind == "staged" and staged.task == "embed" and 0.5 < staged.agreement <= 1.0
    assert set(staged.to_dict()) >= {"agreement", "accuracy_drop", "metrics", "timings_ms", "notes"}


def _prompts(path: Path, images: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_mllm_against_itself_and_damaged(images, tmp_path):
    model = _copy("mllm_fastv", tmp_path)
    data = _prompts(
        tmp_path / "p.jsonl",
        images,
        [
            {"image": str(images / "0.png"), "prompt": "What is this?", "answer": "x"},
            {"prompt": "Say hi " * 20, "continuation": "and goodbye to all of you"},
        ],
    )
    same = tokensieve.load(model).eval(data, baseline=model, new_tokens=6)
    assert same.task == "generate" and same.agreement == 1.0 and same.metrics["identical"] == 1.0
    assert same.accuracy_drop == 0.0 and same.timings_ms["prefill"] > 0 and len(same.cases) == 2
    perplexity = same.metrics["perplexity"]
    assert perplexity == same.metrics["baseline_perplexity"] and 1 < perplexity < 1e6
    damaged = Path(shutil.copytree(model, tmp_path / "damaged"))
    for graph in ("prefill.onnx", "decode.onnx"):
        _negate(damaged / graph, "logits")
    report = tokensieve.load(damaged).eval(data, baseline=model, new_tokens=6)
    assert report.agreement < 1.0 and report.cases[0]["first_divergence"] == 0
    assert report.metrics["perplexity"] != report.metrics["baseline_perplexity"]
    assert main(["eval", str(damaged), "--data", str(data)]) == 2  # no --baseline: a typed error


def test_bad_input_names_the_line_or_file(images, tmp_path):
    model = tokensieve.load(_copy("mllm_fastv", tmp_path))
    bad = _prompts(tmp_path / "bad.jsonl", images, [{"prompt": "fine"}, {"image": str(images / "0.png")}])
    with pytest.raises(DataError, match=r'bad.jsonl line 2 has no "prompt"'):
        model.eval(bad, baseline=model)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"broken\.png cannot be read"):
        model.eval(_prompts(tmp_path / "b.jsonl", images, [{"image": str(broken), "prompt": "x"}]), baseline=model)
    folder = tmp_path / "imgs"
    shutil.copytree(images, folder)
    shutil.copy(broken, folder / "9.png")
    embed = tokensieve.load(_copy("image_topk", tmp_path))
    with pytest.raises(DataError, match=r"9\.png cannot be read"):
        embed.eval(folder)
    assert not (embed.path / "eval.json").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no images"):
        embed.eval(tmp_path / "empty")


def test_method_grids():
    assert [s.method for s in expand_grid("tome(r=[4,8,12,16])")] == [f"tome(r={r})" for r in (4, 8, 12, 16)]
    assert [s.label for s in expand_grid("topk(keep=[0.5, 0.7], layers=[3,6,9])")] == ["keep=0.5", "keep=0.7"]
    assert expand_grid("topk(layers=[[3], [3,6]])")[1].method == "topk(layers=[3,6])"
    for grid, message in (
        ("tome(r=[4])", "has 1 value"),
        ("tome(r=4)", "it has none"),
        ("topk(keep=[0.5, 0.7], layers=[[3], [6]])", "it has 2"),
    ):
        with pytest.raises(MethodSpecError, match=message):
            expand_grid(grid)


def test_sweep_writes_table_and_chart_or_nothing(hf_config_dir, images, tmp_path):
    source = f"hf:{hf_config_dir('vit')}"
    with pytest.raises(MethodSpecError, match="a sweep needs 2"):
        tokensieve.sweep(source, "tome(r=[2])", images, tmp_path / "one")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no images"):
        tokensieve.sweep(source, "tome(r=[2, 4])", tmp_path / "empty", tmp_path / "none")
    assert not (tmp_path / "one").exists() and not (tmp_path / "none").exists()
    out = tmp_path / "sweep"
    assert main(["sweep", source, "--method", "tome(r=[2, 6])", "--data", str(images), "--out", str(out)]) == 0
    table = json.loads((out / "sweep.json").read_text())
    assert [r["label"] for r in table["rows"]] == ["r=2", "r=6"] and table["task"] == "embed"
    assert all(r["latency_ms"] > 0 and r["limit_ms"] > 0 for r in table["rows"])
    assert (out / "sweep.png").stat().st_size > 0 and (out / "0_r_2" / "eval.json").is_file()


def test_the_gate_reads_quality_budgets_from_eval_json(images, tmp_path):
    artifact = tokensieve.load(_copy("image_topk", tmp_path))
    policy = Policy(min_agreement=0.5, max_accuracy_drop=0.01)
    statuses = {c.name: c.status for c in gate([artifact.path], policy).artifacts[0].checks}
    assert statuses["min_agreement"] == "fail" and statuses["max_accuracy_drop"] == "fail"  # no eval.json yet
    artifact.eval(images)
    checks = {c.name: c for c in gate([artifact.path], policy).artifacts[0].checks}
    assert checks["min_agreement"].status == "pass" and checks["max_accuracy_drop"].status == "fail"
    assert "no accuracy" in checks["max_accuracy_drop"].detail
    strict = {c.name: c.status for c in gate([artifact.path], Policy(min_agreement=0.9999)).artifacts[0].checks}
    assert strict["min_agreement"] == "fail"
    assert Policy.from_dict({"min_agreement": 0.9}).min_agreement == 0.9
