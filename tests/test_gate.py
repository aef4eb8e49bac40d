"""Registry gate: file digests, lint, golden parity replay (values and selections, torch-free) and policy budgets;
a damaged artifact fails the right check, bad policies are typed errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from xml.etree import ElementTree

import numpy as np
import pytest

import tokensieve
from tokensieve.cli import main
from tokensieve.errors import GateError
from tokensieve.gate import Policy, gate

METHOD = "topk(keep=0.5, layers=[1]) + tome(r=6, layers=[3,4])"


@pytest.fixture(scope="module")
def checked(hf_config_dir, tmp_path_factory):
    """A ViT artifact with a pruning and two merging sites, its parity checked (golden files written)."""
    out = tmp_path_factory.mktemp("gate") / "vit"
    artifact = tokensieve.export(f"hf:{hf_config_dir('vit')}", METHOD, out)
    assert artifact.parity().ok
    return out


def _copy(checked, root, name):
    shutil.copytree(checked, root / name)
    return root / name


def _statuses(artifact_gate):
    return {c.name: c.status for c in artifact_gate.checks}


def test_a_checked_artifact_passes_and_the_replay_repeats_parity(checked):
    report = gate([checked])
    assert report.ok, report.text()
    assert _statuses(report.artifacts[0]) == {"files": "pass", "lint trt10.3": "pass", "parity": "pass"}
    replay = tokensieve.load(checked).replay()
    assert replay.ok and [s.method for s in replay.sites] == ["topk", "tome", "tome"]
    assert replay.reference == "golden eager outputs" and replay.outputs[0].relative < 1e-5
    assert main(["parity", str(checked), "--replay"]) == 0
    assert set(json.loads((checked / "manifest.json").read_text())["files"]) == {
        "baseline.onnx",
        "model.onnx",
        "weights.data",
    }


def test_damage_fails_the_check_that_sees_it(checked, tmp_path):
    registry = tmp_path / "registry"
    registry.mkdir()
    weights = _copy(checked, registry, "weights_edited") / "weights.data"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 4096] = bytes(4096)  # zero a stretch of some weight tensor
    weights.write_bytes(bytes(data))
    # the recorded eager selection of the first site disagrees with the graph: swap a kept token for a dropped one
    sites = _copy(checked, registry, "golden_edited") / "golden" / "eager_sites.npz"
    with np.load(sites) as npz:
        records = dict(npz)
    kept = records["1/kept"]
    dropped = min(set(range(1, 197)) - set(kept[0].tolist()))  # a patch token (CLS is 0) the graph drops
    kept[0, -1] = dropped
    records["1/kept"] = np.sort(kept, axis=1)
    np.savez(sites, **records)
    shutil.rmtree(_copy(checked, registry, "no_golden") / "golden")

    report = gate([registry])
    by_name = {a.path.rsplit("/", 1)[-1]: _statuses(a) for a in report.artifacts}
    assert not report.ok and sorted(by_name) == ["golden_edited", "no_golden", "weights_edited"]
    assert by_name["weights_edited"]["files"] == "fail" and by_name["weights_edited"]["parity"] == "fail"
    assert by_name["golden_edited"] == {"files": "pass", "lint trt10.3": "pass", "parity": "fail"}
    assert by_name["no_golden"]["parity"] == "fail"
    assert _statuses(gate([registry / "no_golden"], Policy(require_golden=False)).artifacts[0])["parity"] == "skip"
    detail = next(c.detail for c in report.artifacts[2].checks if c.name == "files")
    assert "weights.data" in detail and "changed since export" in detail

    junit = tmp_path / "gate.xml"
    assert main(["gate", str(registry), "--junit", str(junit)]) == 1
    suites = ElementTree.parse(junit).getroot()
    assert [int(s.get("failures")) for s in suites] == [1, 1, 2]
    assert suites[0].find("testcase[@name='parity']/failure") is not None


def test_budgets(checked, tmp_path):
    macs = json.loads((checked / "manifest.json").read_text())["macs"]
    ok = Policy(methods=("topk", "tome"), max_opset=18, min_limit_speedup=1.1, max_macs=macs["model"])
    assert gate([checked], ok).ok
    strict = Policy(
        methods=("topk",),
        max_opset=17,
        min_limit_speedup=macs["limit_speedup"] + 0.01,
        max_macs=macs["model"] - 1,
        min_fraction_of_limit=0.5,
        max_cache_slots=512,
    )
    statuses = _statuses(gate([checked], strict).artifacts[0])
    assert statuses == {
        "files": "pass",
        "lint trt10.3": "pass",
        "parity": "pass",
        "methods": "fail",
        "max_opset": "fail",
        "min_limit_speedup": "fail",
        "max_macs": "fail",
        "fraction_of_limit": "fail",  # no bench.json yet
        "max_cache_slots": "skip",  # not an MLLM
    }
    bench = _copy(checked, tmp_path, "benched")
    rows = [{"batch": 1, "fraction_of_limit": 0.9}, {"batch": 8, "fraction_of_limit": 0.6}]
    (bench / "bench.json").write_text(json.dumps({"rows": rows}))
    assert _statuses(gate([bench], Policy(min_fraction_of_limit=0.5)).artifacts[0])["fraction_of_limit"] == "pass"
    assert _statuses(gate([bench], Policy(min_fraction_of_limit=0.7)).artifacts[0])["fraction_of_limit"] == "fail"


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        ({"max_flops": 1}, "unknown policy key(s) ['max_flops']"),
        ({"min_limit_speedup": "fast"}, "must be a non-negative number"),
        ({"require_golden": "yes"}, "must be true or false"),
        ({"methods": "topk"}, "must be a list of method names"),
        ({"methods": ["topk", "tomee"]}, "names unknown method(s) ['tomee']; known:"),
        ({"target": "trt9"}, "lint target 'trt9' is unknown"),
    ],
)
def test_bad_policies_are_typed_errors(checked, tmp_path, capsys, policy, message):
    with pytest.raises(GateError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        Policy.from_dict(policy)
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(policy))
    capsys.readouterr()
    assert main(["gate", str(checked), "--policy", str(path)]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_bad_paths_and_files(tmp_path, capsys):
    (tmp_path / "policy.json").write_text("{not json")
    for args in (
        [str(tmp_path / "missing")],
        [str(tmp_path)],  # a folder without artifacts
        [str(tmp_path), "--policy", str(tmp_path / "policy.json")],
    ):
        assert main(["gate", *args]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_gate_runs_without_torch(checked, tmp_path):
    """The gate is for registries and deployment boxes: it replays parity with torch blocked."""
    code = f"""
import sys
sys.modules['torch'] = None
from tokensieve.cli import main
rc = main(['gate', {str(checked)!r}, '--json'])
loaded = [m for m in sys.modules if sys.modules[m] is not None]
print(rc, any(m.startswith(('tokensieve.converters', 'tokensieve.reference', 'transformers', 'timm')) for m in loaded))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    *report, verdict = result.stdout.strip().splitlines()
    assert verdict == "0 False" and json.loads("\n".join(report))["ok"]


def test_a_graph_the_target_rejects_fails_lint(tmp_path):
    """Opset 23 exports fuse attention into ONNX `Attention`, which TensorRT 10.3 lacks and 10.x (latest) has."""
    out = tmp_path / "opset23"
    tokensieve.export("timm:vit_small_patch16_224?depth=3", "topk(keep=0.5, layers=[1])", out, opset=23)
    report = gate([out], Policy(require_golden=False))
    check = next(c for c in report.artifacts[0].checks if c.name == "lint trt10.3")
    assert check.status == "fail" and "Attention" in check.detail and not report.ok
    assert _statuses(gate([out], Policy(target="trt10", require_golden=False)).artifacts[0])["lint trt10"] == "pass"
