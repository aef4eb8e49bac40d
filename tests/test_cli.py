"""The user-facing CLI contract: the README commands work as written, and bad input fails cleanly."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from tokensieve.bench.image import time_alternating
from tokensieve.cli import main
from tokensieve.errors import OptionError

METHOD = "topk(keep=0.7, layers=[3,6,9])"


@pytest.fixture(scope="module")
def vits(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "vits"
    assert main(["export", "timm:vit_small_patch16_224", "--method", METHOD, "--out", str(out)]) == 0
    return out


def test_export_writes_a_complete_artifact(vits):
    assert sorted(os.listdir(vits)) == ["baseline.onnx", "manifest.json", "model.onnx", "weights.data"]
    manifest = json.loads((vits / "manifest.json").read_text())
    assert manifest["methods"] == [
        {
            "name": "topk",
            "keep": "7/10",
            "layers": [3, 6, 9],
            "fuse": None,
            "score": "auto",
        }
    ]
    assert manifest["tokens_per_block"]["model"] == [197] * 4 + [139] * 3 + [98] * 3 + [69] * 2
    assert manifest["macs"]["baseline"] > manifest["macs"]["model"] > 0
    assert manifest["lint"]["ok"] and manifest["export"] == {
        "exporter": "dynamo",
        "opset": 18,
        "batch": 1,
        "dynamic_batch": False,
    }
    assert [s["params"]["kept"] for s in manifest["sites"]] == [138, 97, 68]
    assert manifest["weights_sha256"] and manifest["versions"]["onnxruntime"]
    # both graphs share one weights file; the reduced graph adds only small constants
    assert os.path.getsize(vits / "model.onnx") < 2_000_000


def test_inspect(vits, capsys):
    assert main(["inspect", str(vits)]) == 0
    text = capsys.readouterr().out
    assert "12 found" in text and "topk(kept=138) -> 139 tokens" in text and "MAC-limit speedup" in text
    assert main(["inspect", str(vits), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [b["tokens_model"] for b in info["blocks"]][3:5] == [197, 139]


def test_parity_writes_polygraphy_golden_files(vits, capsys):
    assert main(["parity", str(vits)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("parity: PASS") and "same token groups in 1/1 samples" in text
    from polygraphy.comparator import RunResults
    from polygraphy.json import load_json

    inputs = load_json(str(vits / "golden" / "inputs.json"))
    assert inputs[0]["pixel_values"].shape == (1, 3, 224, 224)
    eager = RunResults.load(str(vits / "golden" / "eager_outputs.json"))
    ort = RunResults.load(str(vits / "golden" / "ort_outputs.json"))
    np.testing.assert_allclose(eager[0][1][0]["logits"], ort[0][1][0]["logits"], atol=1e-4)


def test_lint_file_and_directory(vits, capsys):
    assert main(["lint", str(vits / "model.onnx"), "--target", "trt10.3"]) == 0
    assert "OK (0 errors" in capsys.readouterr().out
    assert main(["lint", str(vits), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True


def test_bench_writes_json_and_plot(vits, capsys):
    assert main(["bench", str(vits), "--warmup", "1", "--blocks", "2", "--per-block", "1"]) == 0
    text = capsys.readouterr().out
    assert "achieved/limit" in text
    report = json.loads((vits / "bench.json").read_text())
    assert report["rows"][0]["batch"] == 1 and report["rows"][0]["limit_speedup"] > 1.3
    assert (vits / "bench.png").stat().st_size > 0


def test_method_none_is_a_baseline_artifact(tmp_path, capsys):
    out = tmp_path / "base"
    assert main(["export", "timm:vit_small_patch16_224", "--method", "none", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["methods"] == [] and manifest["graphs"]["model"] == manifest["graphs"]["baseline"]
    assert manifest["macs"]["limit_speedup"] == 1.0
    assert sorted(os.listdir(out)) == ["manifest.json", "model.onnx", "weights.data"]
    assert main(["parity", str(out), "--no-golden"]) == 0
    assert main(["bench", str(out)]) == 2
    assert "nothing to compare" in capsys.readouterr().err


def test_console_script_and_module_entry_point(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tokensieve", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "export" in result.stdout


# -- bad input: typed error, one line, exit 2, nothing half-written ---------------------------------------------


def _no_leftovers(parent, name):
    return not any(p.name.startswith(f".{name}.") for p in parent.iterdir()) and not (parent / name).exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["timm:vit_nonexistent_model"], "unknown timm model 'vit_nonexistent_model'"),
        (["timm:vit_small_patch16_224", "--method", "topk(keep=1.5)"], "keep must be in (0, 1]"),
        (
            ["timm:vit_small_patch16_224", "--method", "topk(keep=0.5, layers=[3, 12])"],
            "layer 12 is out of range",
        ),
        (["timm:vit_small_patch16_224", "--method", "prune(k=3)"], "unknown method 'prune'"),
        (["timm:vit_small_patch16_224", "--method", "tome(r=120)"], "r=120 is larger than the tokens allow"),
        (["timm:vit_small_patch16_224", "--method", "topk(keep=1e400)"], "got a number beyond 1e300"),
        (["timm:vit_small_patch16_224", "--method", "atp()", "--buckets", "64,,96"], "comma-separated token counts"),
        (
            ["timm:vit_small_patch16_224", "--method", "diffrate(prune=[197, 150], merge=[197, 140])"],
            "the table has 2 entries but the model has 12 blocks",
        ),
        (["timm:vit_small_patch16_224?global_pool=avg&bogus=1"], "does not accept these options"),
        (["hf:not-a-preset"], "neither a preset"),
        (["missing.onnx"], "does not exist"),
        (["resnet50"], "unknown model source"),
        (["timm:vit_small_patch16_224", "--opset", "14"], "the dynamo exporter writes opset >= 18; use the legacy"),
        (["timm:vit_small_patch16_224", "--opset", "21", "--exporter", "legacy"], "opset 14-20 with the legacy"),
    ],
)
def test_bad_export_input(tmp_path, capsys, args, message):
    code = main(["export", *args, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1
    assert _no_leftovers(tmp_path, "out")


@pytest.mark.parametrize(
    "args",
    [
        ["bench", "DIR", "--blocks", "0"],
        ["bench", "DIR", "--contexts", "8", "0"],
        ["bench", "DIR", "--threads", "two"],
        ["parity", "DIR", "--cases", "0"],
        ["parity", "DIR", "--new-tokens", "-1"],
        ["generate", "DIR", "--prompt", "hi", "--max-new-tokens", "-3"],
        ["plan", "hf:llava-tiny", "--method", "fastv(k=1)", "--text-tokens", "-1"],
        ["export", "timm:vit_small_patch16_224", "--out", "DIR", "--batch", "0"],
    ],
)
def test_counts_out_of_range_are_refused_before_any_work(tmp_path, capsys, args):
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "a") if a == "DIR" else a for a in args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and ("must be at least" in err or "expected an integer" in err), err
    with pytest.raises(OptionError, match="blocks must be at least 1, got 0"):  # the API holds the same rule
        time_alternating({"a": lambda: None}, 0, 1)


def test_corrupt_onnx(tmp_path, capsys):
    bad, empty = tmp_path / "bad.onnx", tmp_path / "empty.onnx"
    bad.write_bytes(b"this is not a protobuf")
    empty.write_bytes(b"")  # parses as a model without a graph
    for path, message in ((bad, "not a readable ONNX model"), (empty, "holds no ONNX graph")):
        for args in (["lint", str(path)], ["export", str(path), "--out", str(tmp_path / "out")]):
            assert main(args) == 2
            err = capsys.readouterr().err
            assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert _no_leftovers(tmp_path, "out")


def test_damaged_artifacts_and_outputs_inside_an_artifact_are_typed_errors(vits, tmp_path, capsys):
    damaged = tmp_path / "damaged"
    shutil.copytree(vits, damaged)
    with open(damaged / "model.onnx", "r+b") as f:
        f.truncate(1000)
    for command in ("lint", "parity", "bench"):
        assert main([command, str(damaged)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "model.onnx" in err and err.count("\n") == 1, (command, err)
    manifest = json.loads((damaged / "manifest.json").read_text())
    (damaged / "weights.data").unlink()
    assert main(["inspect", str(damaged)]) == 2 and "weights.data is missing" in capsys.readouterr().err
    for bad, message in (
        ([1, 2], "is not a tokensieve manifest"),
        ({"format": "tokensieve-artifact"}, "no graphs"),
        ({**manifest, "format_version": 99}, "format version 99, newer than this tokensieve reads"),
    ):
        (damaged / "manifest.json").write_text(json.dumps(bad))
        assert main(["inspect", str(damaged)]) == 2 and message in capsys.readouterr().err
    before = sorted(os.listdir(vits))
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(images / "black.png")
    for args in (
        ["quantize", str(vits), "--calibrate", str(images), "--out", str(vits)],
        ["jetson", str(vits), "--out", str(vits / "bundle")],
        ["triton", str(vits), "--out", str(vits / "repo")],
        ["jetson", str(vits), "--out", str(tmp_path / "b"), "--dim", "tokens=1:2:3"],
        ["jetson", str(vits), "--out", str(tmp_path / "b"), "--fp16", "--dla", "5"],
        ["triton", str(vits), "--out", str(tmp_path / "r"), "--max-batch", "8"],  # a static batch-1 artifact
        ["parity", str(vits), "--device", "tpu"],
        ["parity", str(vits), "--tolerance", "nan"],
        ["bench", str(vits), "--contexts", "64"],
        ["plan", str(vits), "--method", "tome(r=8)", "--image-tokens", "5"],
    ):
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, (args, err)
    assert sorted(os.listdir(vits)) == before and not list(tmp_path.glob("[br]"))


def test_non_transformer_onnx(tmp_path, capsys):
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])],
    )
    path = tmp_path / "cnn.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    code = main(["export", str(path), "--method", "topk(keep=0.5)", "--out", str(tmp_path / "out")])
    assert code == 2 and "no self-attention found" in capsys.readouterr().err
    assert _no_leftovers(tmp_path, "out")
    # unreduced, any graph makes an artifact; inspect says what it could not find or count
    assert main(["export", str(path), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "blocks     not located: no self-attention found" in out and "MACs       none counted" in out


def test_unwritable_output_directory(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = main(["export", "timm:vit_small_patch16_224", "--method", METHOD, "--out", str(blocker / "sub" / "out")])
    assert code == 2 and "cannot write to" in capsys.readouterr().err


def test_refuses_to_overwrite_a_foreign_directory(tmp_path, capsys):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main(["export", "timm:vit_small_patch16_224", "--out", str(foreign)]) == 2
    assert "is not a tokensieve artifact" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_not_an_artifact(tmp_path, capsys):
    assert main(["parity", str(tmp_path)]) == 2
    assert "is not a tokensieve artifact" in capsys.readouterr().err


def test_parity_of_onnx_source_needs_a_reference(vits, tmp_path, capsys):
    out = tmp_path / "from_onnx"
    assert main(["export", str(vits / "baseline.onnx"), "--method", METHOD, "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["parity", str(out)]) == 2
    assert "--reference" in capsys.readouterr().err
    assert main(["parity", str(out), "--reference", "timm:vit_small_patch16_224", "--no-golden"]) == 0


def test_plan_compares_schedules_before_exporting(vits, capsys):
    assert main(["plan", str(vits), "--method", "tome(r=8)", "--method", "tome(r=16)", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["method"] for r in rows] == ["none", "tome(r=8)", "tome(r=16)"]
    assert rows[2]["tokens_per_block"][-1] == 21 and rows[2]["final_tokens"] == 11
    assert rows[0]["gmacs"] > rows[1]["gmacs"] > rows[2]["gmacs"] and rows[2]["limit_speedup"] > 1.9
    assert main(["plan", str(vits), "--method", "tome(r=99)"]) == 2
    assert "larger than the tokens allow" in capsys.readouterr().err


def test_parity_device_refuses_staged_artifacts(tmp_path, capsys):
    from tokensieve.artifact.store import MANIFEST

    staged = tmp_path / "staged"
    staged.mkdir()
    (staged / MANIFEST).write_text(
        json.dumps({"format": "tokensieve-artifact", "source": {}, "graphs": {}, "stages": {}})
    )
    assert main(["parity", str(staged), "--device", "cuda"]) == 2
    assert "single-graph artifact" in capsys.readouterr().err
