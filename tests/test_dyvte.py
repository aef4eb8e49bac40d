"""DyVTE (training-free exit rule) in exported MLLM graphs: parity with the eager reference (every candidate exit's
kept positions, logits, greedy tokens) where some prompts exit and others do not, the exit score against the
reference's, the rule, the reference against Hugging Face, LLaVA-NeXT, lint, CLI and errors."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch
from helpers import assert_bench_runs, generate_json, hf_greedy_cases, save_four_layer_llava

import tokensieve
from tokensieve.cli import main
from tokensieve.converters.families import build_mllm
from tokensieve.errors import GraphRewriteError, MethodSpecError
from tokensieve.graph_passes import run_passes
from tokensieve.graph_passes.image_attention import ImageAttentionMassPass
from tokensieve.methods.dyvte import DyVTE
from tokensieve.parity.mllm import _hf_processor, default_cases
from tokensieve.reference.decoding import attention_forward
from tokensieve.reference.dyvte import dyvte_generate, image_attention_mass
from tokensieve.runtimes.dyvte import cut
from tokensieve.runtimes.prefill import prefill_feeds


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("dyvte")
    save_four_layer_llava(root / "ckpt")
    cli = ["export", f"hf:{root / 'ckpt'}", "--method", "dyvte(layers=[1, 2, 3], threshold=0.5)"]
    assert main([*cli, "--out", str(root / "deep")]) == 0
    nxt = tokensieve.export("hf:llava-next-tiny", "dyvte(layers=[1], threshold=0.7)", out=root / "next")
    return {"deep": tokensieve.load(root / "deep"), "next": nxt, "root": root}


def _exits(case) -> bool:
    return case.kept_tokens == case.prompt_tokens - case.image_tokens


def test_parity_some_prompts_exit_and_some_do_not(artifacts):
    report = artifacts["deep"].parity(count=4, new_tokens=32)
    assert report.ok, report.text()
    assert len(report.cases) == 8 and {c.cache for c in report.cases} == {"fixed", "growing"}
    for case in report.cases:
        assert case.kept_match and case.tokens_match and case.logits_error < 1e-5
        assert case.kept_tokens in (case.prompt_tokens, case.prompt_tokens - 64)  # all image tokens or none
    assert {_exits(c) for c in report.cases} == {True, False}


def test_parity_llava_next(artifacts):
    report = artifacts["next"].parity(count=4, new_tokens=24)
    assert report.ok, report.text()
    assert all(c.kept_match and c.tokens_match for c in report.cases)
    assert {_exits(c) for c in report.cases} == {True, False}


def test_exit_score_equals_the_reference(artifacts):
    """prefill_0's image_attention_mass (last row, image columns, head mean) against Hugging Face's own layer-0
    probabilities, on processor inputs."""
    built = build_mllm(str(artifacts["root"] / "ckpt"))
    processor = _hf_processor(built.host, built.tokenizer)
    first = artifacts["deep"].llava_runner().prefill.graphs[0]
    masses = []
    for prompt, image in default_cases(built.host, 3, 2):
        inputs = processor(images=image, text=built.host["template"].format(prompt=prompt), return_tensors="pt")
        full = attention_forward(built.model, inputs)
        image_pos = torch.nonzero(inputs["input_ids"][0] == built.model.config.image_token_id)[:, 0]
        expected = image_attention_mass(full.attentions[0], image_pos)
        span = (int(image_pos[0]), int(image_pos[-1]) + 1)
        got = first.run(prefill_feeds(first, full.hidden_states[0].numpy(), span))["image_attention_mass"]
        assert got.shape == (1,) and abs(float(got[0]) - expected) < 1e-6
        masses.append(expected)
    assert all(0 < m < 1 for m in masses) and len(set(masses)) == 3


def test_rule_on_hand_made_masses():
    method, positions, image, span = DyVTE(layers=[1], threshold=0.3), np.arange(10), np.arange(2, 6), (2, 6)
    text = [0, 1, 6, 7, 8, 9]
    kept, left = cut({"image_attention_mass": np.array([0.29], np.float32)}, positions, image, span, method)
    assert kept.tolist() == text and len(left) == 0
    for mass in (0.3, 0.9):  # at or above the threshold (strict <): nothing leaves
        kept, left = cut({"image_attention_mass": np.array([mass], np.float32)}, positions, image, span, method)
        assert kept.tolist() == list(range(10)) and left.tolist() == [2, 3, 4, 5]
    gone = cut({"image_attention_mass": np.zeros(1, np.float32)}, np.array(text), image[:0], span, method)
    assert gone[0].tolist() == text  # once exited, later cuts keep what is left


def test_reference_equals_hf_generate_when_it_never_exits():
    exited = 0
    for model, inputs, expected, logits in hf_greedy_cases("llava-tiny", 3, 1, 12):
        never = dyvte_generate(model, inputs, DyVTE(layers=[1], threshold=0.0), 12)
        assert len(never.kept_positions) == inputs["input_ids"].shape[1] and never.ids == expected
        assert torch.allclose(never.prefill_logits, logits, atol=1e-5, rtol=0)
        always = dyvte_generate(model, inputs, DyVTE(layers=[1], threshold=1.0), 12)
        assert len(always.kept_positions) == inputs["input_ids"].shape[1] - 64
        exited += always.ids != expected
    assert exited  # removing the image changes what a random model says


def test_lint_inspect_generate_and_text_only(artifacts, capsys):
    artifact = artifacts["deep"]
    manifest = artifact.manifest
    assert manifest.method_text == "dyvte(layers=[1, 2, 3], threshold=0.5)"
    assert [k for k in manifest.graphs if k.startswith("prefill")] == [f"prefill_{i}" for i in range(4)]
    for entry in (*manifest.lint.values(), *artifacts["next"].manifest.lint.values()):
        assert entry["ok"], entry
    decode = {v["name"] for v in manifest.io["decode"]["inputs"]}
    assert {"pruned_cache_position", "pruned_cache_position_1", "pruned_cache_position_2"} <= decode
    assert main(["inspect", str(artifact.path)]) == 0
    assert "is below 0.5" in capsys.readouterr().out
    out = generate_json(artifact.path, artifacts["root"] / "image.png", capsys)
    assert len(out["cut_counts"]) == 3 and set(out["cut_counts"]) <= {out["prompt_tokens"], out["prompt_tokens"] - 64}
    text = artifact.generate(None, "no picture", 4, ignore_eos=True, template="USER: {prompt} ASSISTANT:")
    assert all(len(c) == len(text.prompt_ids) for c in text.cut_positions)


def test_bad_requests_are_typed_errors(tmp_path):
    with pytest.raises(MethodSpecError, match="layer 2 is out of range; this decoder has 2 layers"):
        tokensieve.export("hf:llava-tiny", "dyvte(layers=[1, 2])", out=tmp_path / "out")
    with pytest.raises(MethodSpecError, match=r"threshold \(an attention mass\) must be in \[0, 1\]"):
        DyVTE(threshold=2)
    with pytest.raises(MethodSpecError, match="decoder layers >= 1 to cut before"):
        DyVTE(layers=[0])
    assert not (tmp_path / "out").exists()
    assert main(["export", "hf:llava-tiny", "--method", "dyvte(layers=[5])", "--out", str(tmp_path / "out")]) == 2


def test_pass_refuses_a_decode_graph(artifacts):
    with pytest.raises(GraphRewriteError, match="dyvte: expected a prefill graph"):
        run_passes(ir.load(artifacts["deep"].path / "decode.onnx"), [ImageAttentionMassPass(0)])


def test_bench_drives_the_method_graphs(artifacts):
    for key in ["deep"]:
        assert_bench_runs(artifacts[key])
