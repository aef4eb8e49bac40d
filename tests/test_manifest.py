"""The typed manifest: format version 2 round-trips, version 1 artifacts (written by the version-1 code, committed
under ``tests/data/v1/``) load as their kind and replay their golden files, and bad manifests are typed errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import tokensieve
from tokensieve import manifest as manifest_file
from tokensieve.errors import ArtifactError
from tokensieve.manifest import FORMAT_VERSION, ImageManifest, MllmManifest, StagedManifest

V1 = Path(__file__).parent / "data" / "v1"


@pytest.mark.parametrize(
    ("name", "kind", "cls"),
    [
        ("image_topk", "image", ImageManifest),
        ("staged_atp", "staged", StagedManifest),
        ("mllm_fastv", "mllm", MllmManifest),
    ],
)
def test_version_1_artifacts_load_and_replay(tmp_path, name, kind, cls):
    directory = shutil.copytree(V1 / name, tmp_path / name)
    assert json.loads((directory / "manifest.json").read_text())["format_version"] == 1
    artifact = tokensieve.load(directory)
    assert artifact.kind == kind and type(artifact.manifest) is cls and artifact.manifest.format_version == 1
    assert artifact.manifest.graphs and artifact.manifest.source["kind"] == "hf"
    report = artifact.replay()
    assert report.ok, report.text()


def test_version_1_reads_back_as_version_2_unchanged():
    for name in ("image_topk", "staged_atp", "mllm_fastv"):
        data = json.loads((V1 / name / "manifest.json").read_text())
        typed = manifest_file.read_dict(data, name)
        written = typed.to_dict()
        assert written["format_version"] == FORMAT_VERSION and written["kind"] == typed.kind
        assert {k: v for k, v in written.items() if k not in ("format_version", "kind")} == {
            k: v for k, v in data.items() if k not in ("format_version", "kind")
        }
        assert manifest_file.read_dict(written, name) == typed.replace(format_version=FORMAT_VERSION)


def test_unknown_keys_survive_and_copies_share_nothing():
    data = json.loads((V1 / "image_topk" / "manifest.json").read_text())
    typed = manifest_file.read_dict({**data, "future_field": {"a": 1}}, "m")
    assert typed.extra == {"future_field": {"a": 1}} and typed.to_dict()["future_field"] == {"a": 1}
    copy = typed.replace(method_text="x")
    copy.graphs["model"] = "other.onnx"
    assert typed.graphs["model"] == "model.onnx" and copy.method_text == "x" and typed.method_text != "x"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format": "other"}, "is not a tokensieve manifest"),
        ({"format_version": FORMAT_VERSION + 1}, "newer than this tokensieve reads"),
        ({"graphs": None}, "names no graphs"),
        ({"kind": "video"}, "unknown artifact kind 'video'"),
        ({"kind": "staged"}, "lacks stages"),
    ],
)
def test_bad_manifests_are_typed_errors(change, message):
    data = {**json.loads((V1 / "image_topk" / "manifest.json").read_text()), **change}
    with pytest.raises(ArtifactError, match=message):
        manifest_file.read_dict(data, "m")


def test_a_list_is_not_a_manifest(tmp_path):
    (tmp_path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(ArtifactError, match="is not a tokensieve manifest"):
        tokensieve.load(tmp_path)
