"""LLaVA / LLaVA-NeXT split export: host preprocessing, decoder sites, parity with HF generate, errors, CLI."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx_ir as ir
import pytest
import transformers
from helpers import assert_plan_matches_graphs, save_llava_checkpoint
from PIL import Image

import tokensieve
from tokensieve.cli import main
from tokensieve.converters.families import build_mllm
from tokensieve.converters.llava import LLAVA_PRESETS, SPECIAL_TOKENS
from tokensieve.errors import (
    ArtifactError,
    CapacityError,
    InputError,
    MethodSpecError,
    OptionError,
    PromptError,
    SourceError,
)
from tokensieve.graph_passes.locate_decoder import locate_decoder
from tokensieve.graph_passes.macs import count_macs
from tokensieve.parity.mllm import replay_llava_golden
from tokensieve.runtimes.image_families import preprocess

SIZES = [(112, 112), (90, 200), (300, 120), (57, 333), (224, 224), (113, 250)]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    llava = tokensieve.export("hf:llava-tiny", out=root / "llava")
    assert main(["export", "hf:llava-next-tiny", "--out", str(root / "next")]) == 0  # the CLI route
    return {"llava": llava, "next": tokensieve.load(root / "next"), "root": root}


@pytest.mark.parametrize("preset", ["llava-tiny", "llava-next-tiny"])
def test_preprocessing_matches_the_hf_pil_processors(preset):
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    host = build_mllm(preset).host
    kw = {
        "size": {"shortest_edge": host["shortest_edge"]},
        "crop_size": {"height": host["crop"][0], "width": host["crop"][1]},
        "image_mean": host["mean"],
        "image_std": host["std"],
    }
    rng = np.random.default_rng(0)
    variants = [False, True] if preset == "llava-tiny" else [True]
    for do_pad in variants:
        if preset == "llava-tiny":
            processor = LlavaImageProcessorPil(do_pad=do_pad, **kw)
        else:
            processor = LlavaNextImageProcessorPil(image_grid_pinpoints=host["grid_pinpoints"], **kw)
        patches = set()
        for h, w in SIZES:
            image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            reference = processor(images=image, return_tensors="np")["pixel_values"]
            reference = reference[0] if reference.ndim == 5 else reference
            ours, size = preprocess(image, dict(host, do_pad=do_pad))
            assert size == (h, w)
            assert ours.shape == reference.shape
            np.testing.assert_allclose(ours, reference, atol=1e-6)
            patches.add(ours.shape[0])
        if preset == "llava-next-tiny":
            assert patches == {3, 4, 5}  # the aspect ratios select different grids


@pytest.mark.parametrize("kind", ["llava", "next"])
def test_greedy_tokens_and_prefill_logits_match_hf_generate(artifacts, kind):
    report = artifacts[kind].parity(count=4, new_tokens=32)
    assert report.ok, report.text()
    assert len(report.cases) == 8  # 4 prompt/image cases x (fixed, growing) cache
    assert all(c.new_tokens == 32 and c.tokens_match and c.prompt_ids_match for c in report.cases)
    assert max(c.logits_error for c in report.cases) < 1e-5
    image_tokens = {c.image_tokens for c in report.cases}
    assert image_tokens == ({64} if kind == "llava" else {136, 200, 244, 336})
    # the generations differ between cases: the test would notice an ignored image or prompt
    assert len({tuple(c.ids) for c in report.cases}) > 1


@pytest.mark.parametrize("kind", ["llava", "next"])
def test_two_images_in_one_prompt(artifacts, kind):
    """Two images (the placeholder twice, their runs adjacent): features in order over the image tokens, as the
    processor and the model place them; recorded and replayed from the golden files."""
    rng = np.random.default_rng(9)
    images = [rng.integers(0, 256, size, dtype=np.uint8) for size in ((112, 112, 3), (60, 200, 3))]
    report = artifacts[kind].parity(cases=[("Compare them.", images)], new_tokens=16, caches=("fixed",))
    assert report.ok and report.cases[0].images == 2, report.text()
    assert report.cases[0].image_tokens == (128 if kind == "llava" else 136 + 132)
    assert replay_llava_golden(artifacts[kind], caches=("fixed",)).ok


def test_all_graphs_are_lint_clean_and_the_decode_graph_is_static(artifacts):
    for kind in ("llava", "next"):
        artifact = artifacts[kind]
        assert artifact.lint("trt10.3").ok
        assert set(artifact.manifest.graphs) == {
            "vision",
            "embed",
            "prefill",
            "decode",
            "decode_growing",
            "external_data",
        }
        decode = ir.load(artifact.graph_path("decode"))
        assert all(isinstance(d, int) for v in [*decode.graph.inputs, *decode.graph.outputs] for d in v.shape)
        assert "decode" not in artifact.manifest.dynamic
        assert [n.op_type for n in decode.graph].count("ScatterND") == 2 * artifact.manifest.decoder["layers"]
    assert "vision" not in artifacts["llava"].manifest.dynamic  # one image, one patch: static
    assert "vision" in artifacts["next"].manifest.dynamic


def test_weights_are_stored_once(artifacts):
    artifact = artifacts["llava"]
    model = build_mllm("llava-tiny").model
    parameter_bytes = sum(p.numel() * 4 for p in model.parameters())
    size = (artifact.path / "weights.data").stat().st_size
    assert size <= 1.05 * parameter_bytes  # five graphs, shared decoder layers, one copy


def test_decoder_sites_are_q_and_k_after_rope(artifacts):
    """Expose the located Q, K (after RoPE) and the attention probabilities of the fixed-cache decode graph and
    recompute the probabilities from Q and the updated cache: the sites are the real attention operands."""
    from tokensieve.runtimes.ort import OrtRunner

    artifact = artifacts["llava"]
    decoder = artifact.manifest.decoder
    path = artifact.graph_path("decode")
    layout = locate_decoder(ir.load(path))
    assert layout.cache == "fixed" and len(layout.layers) == decoder["layers"]
    assert (layout.heads, layout.kv_heads, layout.head_dim) == (4, 2, 16)
    site = layout.layers[1]
    names = [site.query.name, site.key.name, site.softmax.outputs[0].name]
    runner = OrtRunner(path, extra_outputs=names)
    rng = np.random.default_rng(0)
    capacity, position = decoder["capacity"], 37
    feeds = {
        "input_ids": np.array([[9]]),
        "position_ids": np.array([[position]]),
        "cache_position": np.array([position]),
    }
    for i in range(decoder["layers"]):
        for k in ("key", "value"):
            feeds[f"cache_{k}_{i}"] = rng.standard_normal((1, 2, capacity, 16), dtype=np.float32)
    out = runner.run(feeds)
    query, key, probs = (out[n] for n in names)
    cache = out["updated_key_1"]
    np.testing.assert_array_equal(cache[:, :, position], key[:, :, 0])  # the new key is written at its slot
    np.testing.assert_array_equal(np.delete(cache, position, 2), np.delete(feeds["cache_key_1"], position, 2))
    keys = np.repeat(cache, 2, axis=1)  # GQA: 4 query heads share 2 KV heads
    logits = query @ keys.transpose(0, 1, 3, 2) / 4.0
    logits[..., position + 1 :] = -np.inf
    expected = np.exp(logits - logits.max(-1, keepdims=True))
    expected /= expected.sum(-1, keepdims=True)
    np.testing.assert_allclose(probs, expected, rtol=1e-4, atol=1e-6)
    prefill = artifact.manifest.sites["prefill"]["sites"][0]
    assert prefill["key"]["value"] == "present_key_0" and prefill["query"]["shape"] == [1, 4, "sequence", 16]
    growing = artifact.manifest.sites["decode_growing"]
    assert growing["cache"] == "growing" and growing["sites"][0]["cache_read"] == ["past_key_0", "past_value_0"]


def test_checkpoint_directory_source(tmp_path):
    """A local checkpoint directory (weights, tokenizer, preprocessor config) exports and holds parity."""
    built = build_mllm("llava-tiny", seed=5)
    checkpoint = tmp_path / "ckpt"
    save_llava_checkpoint(built.model, built.tokenizer, checkpoint)
    artifact = tokensieve.export(f"hf:{checkpoint}", out=tmp_path / "art", capacity=256, growing_cache=False)
    assert artifact.manifest.decoder["capacity"] == 256 and "decode_growing" not in artifact.manifest.graphs
    report = artifact.parity(count=2, new_tokens=12)
    assert report.ok, report.text()
    assert [c.cache for c in report.cases] == ["fixed", "fixed"]


def _config_only_checkpoint(directory, text_config):
    """A LLaVA config directory (no weights: tokensieve draws random ones) around the given language model."""
    vision = transformers.CLIPVisionConfig(**LLAVA_PRESETS["llava-tiny"]["vision"])
    transformers.LlavaConfig(
        vision_config=vision,
        text_config=text_config,
        image_token_id=SPECIAL_TOKENS.index("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    ).save_pretrained(directory)
    return directory


def test_other_decoder_families_hold_parity_and_mismatched_forwards_are_refused(tmp_path):
    """A Qwen2 language model (biased Q/K/V projections) exports with FastV and holds parity; Granite, whose forward
    scales the input embeddings outside its layers, is refused at load rather than exported into wrong graphs."""
    text = LLAVA_PRESETS["llava-tiny"]["text"]
    qwen = _config_only_checkpoint(tmp_path / "qwen2", transformers.Qwen2Config(**text))
    artifact = tokensieve.export(f"hf:{qwen}", "fastv(k=1, keep=0.5)", out=tmp_path / "qwen_fastv")
    report = artifact.parity(count=1, new_tokens=8)
    assert report.ok, report.text()
    assert artifact.lint("trt10.3").ok
    granite_text = transformers.GraniteConfig(**text, embedding_multiplier=2.0)
    granite = _config_only_checkpoint(tmp_path / "granite", granite_text)
    with pytest.raises(SourceError, match="GraniteModel's forward does more than run its decoder layers"):
        tokensieve.export(f"hf:{granite}", out=tmp_path / "granite_out")
    assert not (tmp_path / "granite_out").exists()


def test_placeholders_capacity_and_bad_sources_are_typed_errors(artifacts, tmp_path):
    artifact = artifacts["llava"]
    runner = artifact.llava_runner()
    image = np.zeros((64, 64, 3), np.uint8)
    ids = runner.prompt_ids("hello")
    doubled = np.concatenate([ids, ids])  # two <image> placeholders for one image
    with pytest.raises(PromptError, match="2 image placeholders but the image gives 64"):
        runner.generate(image, input_ids=doubled)
    with pytest.raises(PromptError, match="no image was given"):
        runner.generate(None, "what is <image> here?")
    assert runner.host["image_token_id"] in ids  # the chat template's <image> line, left out without an image
    assert runner.host["image_token_id"] not in runner.prompt_ids("hello", image=False)
    with pytest.raises(CapacityError, match="holds 512"):
        runner.generate(image, "x" * 500)
    prompt_length = len(runner.prompt_ids("")) - 1 + 64  # the placeholder becomes 64 image tokens
    runner.check_capacity(prompt_length, 513 - prompt_length)  # exactly full: the last token is never cached
    with pytest.raises(CapacityError, match="need 513 cache slots"):
        runner.generate(image, max_new_tokens=514 - prompt_length)
    with pytest.raises(InputError, match="cannot read image"):
        runner.generate(tmp_path / "missing.png", "hi")
    with pytest.raises(InputError, match=r"the image is empty \(0x80 pixels\)"):
        runner.generate(np.zeros((0, 80, 3), np.uint8), "hi")
    for bad in ([-3, 1], [5.7, 6.2], [], [1, 10**6]):  # Gather would wrap a negative id; floats would truncate
        with pytest.raises(PromptError, match="input_ids must be a non-empty sequence of integer token ids"):
            runner.generate(input_ids=bad)
    for count in (-1, 2.5, "4", None):
        with pytest.raises(PromptError, match="max_new_tokens must be an integer >= 0"):
            runner.generate(None, "hi", count)
    with pytest.raises(PromptError, match="the prompt must be a str"):
        runner.generate(None, None)
    with pytest.raises(ArtifactError, match="check_llava_parity of an MLLM artifact takes no reference"):
        artifact.parity(reference="timm:vit_small_patch16_224")
    with pytest.raises(MethodSpecError, match="a method object or a list of them; got 5"):
        tokensieve.export("hf:llava-tiny", ["fastv(k=1)", 5], out=tmp_path / "out")
    with pytest.raises(InputError, match="has more than 8 bits per channel"):  # PIL would clip it to white
        runner.generate(Image.fromarray(np.full((32, 32), 40000, np.uint16)), "hi")
    for template in ("USER: <image>\n ASSISTANT:", "{"):
        with pytest.raises(PromptError, match=r"has no \{prompt\}"):
            runner.prompt_ids("hi", template)
    braces = runner.prompt_ids("hi", "USER: <image>\n{prompt} {as JSON} ASSISTANT:")  # other braces are text
    assert runner.tokenizer.decode(braces.tolist()).endswith("hi {as JSON} ASSISTANT:")
    copy = tmp_path / "copy"
    shutil.copytree(artifact.path, copy)
    shutil.rmtree(copy / "tokenizer")
    with pytest.raises(ArtifactError, match=r"the tokenizer .* cannot be read"):
        tokensieve.load(copy).llava_runner()
    with pytest.raises(CapacityError, match=r"contexts must be in 1..511 for this artifact's 512-slot cache"):
        artifact.bench(contexts=[32, 512])
    with pytest.raises(OptionError, match="cases must be at least 1, got 0"):
        artifact.parity(count=0)
    unsupported = tmp_path / "qwen"
    unsupported.mkdir()
    (unsupported / "config.json").write_text(json.dumps({"model_type": "idefics3"}))
    with pytest.raises(SourceError, match=r"'idefics3' is not supported; .* MLLMs: llava, .*, qwen2_5_vl, qwen2_vl"):
        tokensieve.export(f"hf:{unsupported}", out=tmp_path / "out")
    with pytest.raises(MethodSpecError, match="reduces ViT blocks; an MLLM export takes decoder methods"):
        tokensieve.export("hf:llava-tiny", "topk(keep=0.5)", out=tmp_path / "out")
    with pytest.raises(MethodSpecError, match="--buckets do not apply to MLLM exports"):
        tokensieve.export("hf:llava-tiny", buckets="auto", out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_generate_inspect_parity_lint_bench(artifacts, capsys):
    root = artifacts["root"]
    image = root / "image.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (90, 200, 3), dtype=np.uint8)).save(image)
    directory = str(root / "next")
    capsys.readouterr()
    assert main(["generate", directory, "--image", str(image), "--prompt", "What is this?", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["ids"]) <= 32 and out["image_span"][1] - out["image_span"][0] == 200
    growing = ["generate", directory, "--image", str(image), "--prompt", "What is this?", "--json"]
    assert main([*growing, "--cache", "growing"]) == 0
    assert json.loads(capsys.readouterr().out)["ids"] == out["ids"]
    assert main(["inspect", directory]) == 0
    text = capsys.readouterr().out
    assert "decode.onnx" in text and "Q add_" in text and "ScatterND" in text and "fixed cache 1024 slots" in text
    assert "cache outputs present_key_0, present_value_0" in text  # prefill: cache written, never read
    assert main(["parity", directory, "--cases", "1", "--new-tokens", "6"]) == 0
    assert "parity OK" in capsys.readouterr().out
    # the recorded eager side replays without the model; a recorded token that differs is caught
    assert main(["parity", directory, "--replay"]) == 0
    assert "parity OK against golden eager outputs" in capsys.readouterr().out
    assert main(["gate", directory, "--policy", str(_policy(root, max_cache_slots=1024))]) == 0
    assert "pass  parity                 2/2 recorded cases reproduced" in capsys.readouterr().out
    cases = root / "next" / "golden" / "cases.npz"
    with np.load(cases) as npz:
        recorded = dict(npz)
    recorded["0/ids"][3] += 1
    np.savez(cases, **recorded)
    assert main(["parity", directory, "--replay"]) == 1
    assert main(["gate", directory, "--policy", str(_policy(root, max_cache_slots=512))]) == 1
    text = capsys.readouterr().out
    assert "differ at 3" in text and "fail  max_cache_slots        1024 > 512" in text
    assert main(["lint", directory]) == 0
    assert main(["bench", directory, "--contexts", "64", "1023", "--blocks", "2", "--per-block", "2"]) == 0
    bench = json.loads((root / "next" / "bench.json").read_text())
    assert [r["context"] for r in bench["decode"]] == [64, 1023] and bench["decode"][0]["growing_ms"] > 0
    assert main(["generate", directory, "--image", str(root / "nope.png"), "--prompt", "x"]) == 2


def _policy(root, **budgets):
    path = root / "policy.json"
    path.write_text(json.dumps(budgets))
    return path


def test_generation_runs_without_torch(artifacts):
    """A deployment box may have only onnxruntime (+ numpy, PIL, tokenizers): generate with torch blocked."""
    import subprocess
    import sys

    directory = artifacts["next"].path
    image = np.random.default_rng(3).integers(0, 256, (120, 80, 3), dtype=np.uint8)
    expected = artifacts["next"].generate(image, "Describe it.", 12, ignore_eos=True).ids
    code = f"""
import sys
sys.modules['torch'] = None
import numpy as np
from tokensieve.api import Artifact
image = np.random.default_rng(3).integers(0, 256, (120, 80, 3), dtype=np.uint8)
print(Artifact.load({str(directory)!r}).generate(image, "Describe it.", 12, ignore_eos=True).ids)
loaded = [m for m in sys.modules if sys.modules[m] is not None]
print(any(m.startswith(('tokensieve.converters', 'tokensieve.reference', 'transformers')) for m in loaded))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    ids, imported = result.stdout.strip().splitlines()
    assert ids == str(expected) and imported == "False"


def test_plan_counts_what_the_graphs_compute_and_the_image_tokens_the_runtime_packs(artifacts, capsys):
    from tokensieve.plan.mllm import image_token_count, plan_mllm

    assert_plan_matches_graphs(artifacts["llava"])
    assert_plan_matches_graphs(artifacts["next"])
    runner = artifacts["next"].llava_runner()
    for height, width in SIZES:  # positions and crops as the runtime packs and preprocesses them
        image = Image.new("RGB", (width, height))
        crops = len(preprocess(image, runner.host)[0])
        assert image_token_count(runner.host, (height, width)) == (len(runner.image_features(image)), crops)
    # a preset plans like its artifact; the CLI prints the table or JSON
    candidates = ["fastv(k=1, keep=0.25)", "h2o(budget=40, recent=8)", "streamingllm()", "snapkv(budget=48)"]
    from_source = plan_mllm("hf:llava-tiny", candidates, capacity=64)
    assert from_source == plan_mllm(str(artifacts["llava"].path), candidates, capacity=64)
    prompt, rows = from_source
    assert [r.slots for r in rows] == [prompt.length + 256, prompt.length + 256, 41, 64, 48 + 256]
    assert rows[1].tokens_per_layer == [prompt.length, prompt.length - 64 + 16] and rows[1].limit_speedup > 1
    assert [r.unbounded for r in rows] == [False, False, True, True, False]
    assert rows[2].cached_per_layer == [40, 40] and rows[4].cached_per_layer == [48 + 256] * 2
    cli = ["plan", "hf:llava-next-tiny", "--method", "fastv(k=1)", "--image-size", "300x120", "--new-tokens", "8"]
    assert main([*cli, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    tokens, crops = image_token_count(runner.host, (300, 120))
    per_crop = report["prompt"]["vision_macs"] // crops
    assert report["prompt"] == {
        "image_tokens": tokens,
        "text_tokens": 60,
        "new_tokens": 8,
        "crops": crops,
        "vision_macs": crops * per_crop,
    }
    assert per_crop == count_macs(ir.load(artifacts["next"].graph_path("vision")))
    none, fastv = report["rows"]
    vision = report["prompt"]["vision_macs"]
    assert fastv["limit_speedup_with_vision"] == (vision + none["prefill_macs"]) / (vision + fastv["prefill_macs"])
    assert 1 < fastv["limit_speedup_with_vision"] < fastv["limit_speedup"]
    assert main(cli) == 0 and f"vision graph {vision / 1e9:.3f} GMACs ({crops} crops)" in capsys.readouterr().out
    # a count given without the image size leaves a LLaVA-NeXT's crops, and so its vision cost, unknown
    assert main(["plan", "hf:llava-next-tiny", "--method", "fastv(k=1)", "--image-tokens", "100"]) == 0
    assert "crops unknown: give --image-size" in capsys.readouterr().out
    assert main(["plan", "hf:llava-tiny", "--method", "atp_llava()"]) == 2
    assert "data-dependent count" in capsys.readouterr().err
    assert main(["plan", "hf:llava-tiny", "--method", "fastv(k=2)"]) == 2
    assert "k must be in 1..1" in capsys.readouterr().err
    assert main(["plan", "hf:llava-tiny", "--method", "tome(r=8)"]) == 2
    with pytest.raises(SystemExit):
        main(["plan", "hf:llava-tiny", "--method", "fastv(k=1)", "--image-size", "0x5"])
