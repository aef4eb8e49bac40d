"""p-MoD in exported MLLM graphs: parity with the eager reference (processed positions per MoD layer, logits, 32
greedy tokens) on LLaVA (with router weights) and LLaVA-NeXT (training-free), each MoD layer's
own decode cache slot, the float32 count, plan at LLaVA-1.5-7B geometry, bench, lint, and errors."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch
from helpers import assert_bench_runs, assert_plan_matches_graphs, save_four_layer_llava

import tokensieve
from tokensieve.cli import main
from tokensieve.errors import MethodSpecError
from tokensieve.graph_passes.pmod import load_routers
from tokensieve.methods.decoder import PlanInput
from tokensieve.methods.pmod import PMoD
from tokensieve.reference.pmod import official_count, random_routers
from tokensieve.runtimes.kv_cache import FixedCacheDecoder
from tokensieve.runtimes.llava import expand_placeholders, image_span

IMAGE = 64  # image tokens of the 4-layer LLaVA checkpoint (8 x 8 patches)
PROCESSED = [48, 16, 9]  # its MoD layers 1, 2, 3: ratios 0.75, 0.25, 0.15 of 64


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("pmod")
    save_four_layer_llava(root / "ckpt")
    random_routers(root / "routers.npz", [1, 2, 3], 64)
    method = f"pmod(routers='{root / 'routers.npz'}')"
    out = ["--capacity", "256", "--no-growing-cache", "--out", str(root / "llava")]  # growing: checked by hand
    cli = ["export", f"hf:{root / 'ckpt'}", "--method", method, *out]
    assert main(cli) == 0
    nxt = tokensieve.export("hf:llava-next-tiny", "pmod()", out=root / "next", growing_cache=False)
    return {"llava": tokensieve.load(root / "llava"), "next": nxt, "root": root}


def test_parity_llava_with_routers(artifacts):
    report = artifacts["llava"].parity(count=2, new_tokens=32)
    assert report.ok, report.text()
    assert len(report.cases) == 2 and {c.cache for c in report.cases} == {"fixed"}
    for case in report.cases:
        assert case.kept_match and case.kept_tokens == case.prompt_tokens - IMAGE + PROCESSED[-1]
        assert case.tokens_match and case.new_tokens == 32 and case.logits_error < 1e-5
    out = artifacts["llava"].generate(np.full((112, 112, 3), 90, np.uint8), "Where?", 2, ignore_eos=True)
    text = len(out.prompt_ids) - IMAGE
    assert [len(p) for p in out.cut_positions] == [text + k for k in PROCESSED]
    start, end = out.image_span
    image = [set(p[(p >= start) & (p < end)].tolist()) for p in out.cut_positions]
    assert not image[2] <= image[1]  # each router chooses for itself: the sets are not nested


def test_parity_llava_next_training_free(artifacts):
    """NeXT: the image token count follows the image size; floor(N * 0.15) follows it in the graph."""
    report = artifacts["next"].parity(count=2, new_tokens=32)
    assert report.ok, report.text()
    counts = {(c.image_tokens, c.prompt_tokens - c.kept_tokens) for c in report.cases}
    assert counts == {(n, n - n * 3 // 20) for n in (136, 200)}
    assert all(c.kept_match and c.tokens_match and c.logits_error < 1e-5 for c in report.cases)


def test_each_mod_layer_caches_its_processed_positions_at_its_own_slot(artifacts):
    runner = artifacts["llava"].llava_runner()
    image = np.random.default_rng(2).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    features, image_id = runner.image_features(image), runner.host["image_token_id"]
    ids = expand_placeholders(runner.prompt_ids("Where is it?"), image_id, len(features))
    logits, present, extras = runner.prefill(runner.inputs_embeds(ids, features), image_span(ids, image_id))
    lengths = [len(ids)] + [len(ids) - IMAGE + k for k in PROCESSED]
    assert [t.shape[2] for t in present] == [n for n in lengths for _ in (0, 1)]
    assert [len(p) for p in extras["group_positions"]] == lengths[1:]
    decoder = FixedCacheDecoder(runner.decode, present, 256, dropped=[len(ids) - n for n in lengths[1:]])
    for step in range(3):
        decoder.step(int(np.argmax(logits)), len(ids) + step)
    for layer, length in enumerate(lengths):
        filled = np.abs(decoder.cache(2 * layer)[0, 0]).sum(-1) > 0
        assert filled[: length + 3].all() and not filled[length + 3 :].any()


def test_training_free_choice_is_the_text_to_image_attention_top_k(artifacts):
    """Without routers every MoD layer takes the top of one score (layer first-1's attention): nested sets."""
    from transformers import DynamicCache

    from tokensieve.converters.families import build_mllm
    from tokensieve.parity.mllm import _hf_processor, default_cases
    from tokensieve.reference.decoding import attention_forward
    from tokensieve.reference.pmod import attention_score, mod_prefill

    built = build_mllm(str(artifacts["root"] / "ckpt"))
    prompt, image = default_cases(built.host, 1, 5)[0]
    inputs = _hf_processor(built.host, built.tokenizer)(
        images=image, text=built.host["template"].format(prompt=prompt), return_tensors="pt"
    )
    ids, full = inputs["input_ids"][0], attention_forward(built.model, inputs)
    where = torch.nonzero(ids == built.model.config.image_token_id)[:, 0]
    score = attention_score(full.attentions[0], where)
    _, processed = mod_prefill(built.model, full.hidden_states[0], where, PMoD(), score, DynamicCache())
    ranked = where[torch.argsort(score, descending=True)]
    for kept, count in zip(processed, PROCESSED, strict=True):
        assert set(kept[torch.isin(kept, where)].tolist()) == set(ranked[:count].tolist())
    text = artifacts["next"].generate(None, "no picture", 2, ignore_eos=True, template="USER: {prompt} ASSISTANT:")
    assert text.image_span is None and np.array_equal(text.kept_positions, np.arange(len(text.prompt_ids)))


def test_count_is_floor_of_the_float32_ratio_and_matches_the_official_count():
    method = PMoD()
    assert method.mod_layers(32) == list(range(8, 32)) and method.mod_layers(4) == [1, 2, 3]
    assert [method.processed_image(i, 32, 576) for i in (8, 12, 16, 20, 23, 24, 31)] == [486, 388, 273, 161, 89, 86, 86]
    counts = torch.arange(2365, dtype=torch.int32)
    for layers in (2, 4, 32):
        for i in method.mod_layers(layers):
            ratio = max(method.decay(i, layers), method.min_ratio)
            official = torch.trunc(counts * ratio).int().tolist()
            assert [method.processed_image(i, layers, n) for n in range(2365)] == official, (layers, i)
    # float32 rounding: the first count where the official product rounds up to the next integer
    assert method.processed_image(10, 32, 2365) == official_count(2365, method.decay(10, 32)) - 1


def test_plan_at_llava_1_5_7b_geometry(tmp_path, capsys):
    """32 layers of LLaVA-1.5-7B (config only): MoD layers 8..31 process 546 .. 146 of 636 prompt positions."""
    from tokensieve.converters.families import mllm_config
    from tokensieve.plan.mllm import plan_mllm

    config, _, _ = mllm_config("llava-1.5-7b-shapes")
    config.text_config.num_hidden_layers = 32
    config.save_pretrained(tmp_path)
    _, (base, row) = plan_mllm(str(tmp_path), ["pmod()"], text_tokens=60, new_tokens=256)
    assert row.tokens_per_layer[:9] == [636] * 8 + [546] and row.tokens_per_layer[23:] == [149] + [146] * 8
    assert row.cached_per_layer == [t + 256 for t in row.tokens_per_layer]
    assert 0.57 < row.prefill_macs / base.prefill_macs < 0.58  # the paper: 55.6 % TFLOPs
    assert 0.58 < sum(row.tokens_per_layer) / (32 * 636) < 0.59  # prompt positions cached
    assert main(["plan", "hf:llava-1.5-7b-shapes", "--method", "pmod()"]) == 0
    assert "pmod" in capsys.readouterr().out


def test_graphs_lint_clean_inspect_and_plan_match(artifacts, capsys):
    manifest = artifacts["llava"].manifest
    assert all(entry["ok"] for entry in manifest.lint.values()), manifest.lint
    names = [v["name"] for v in manifest.io["prefill"]["outputs"]]
    assert [n for n in names if n.startswith("group_positions")] == [f"group_positions_{g}" for g in range(3)]
    decode = [v["name"] for v in manifest.io["decode"]["inputs"]]
    assert {"pruned_cache_position", "pruned_cache_position_1", "pruned_cache_position_2"} <= set(decode)
    prefill = ir.load(artifacts["llava"].path / "prefill.onnx")
    ops = {n.op_type for n in prefill.graph}
    assert {"TopK", "ScatterElements", "Tanh"} <= ops and not ops & {"NonZero", "Loop", "Unique"}
    assert all(n.attributes.get_string("reduction", "none") == "none" for n in prefill.graph if "Scatter" in n.op_type)
    assert main(["inspect", str(artifacts["llava"].path)]) == 0
    assert "image tokens processed per layer of 64: 1: 48, 2: 16, 3: 9" in capsys.readouterr().out
    for key in ["llava", "next"]:
        assert_plan_matches_graphs(artifacts[key])


def test_bench_drives_the_method_graphs(artifacts):
    for key in ["llava", "next"]:
        assert_bench_runs(artifacts[key])


def test_bad_pmod_requests_are_typed_errors(tmp_path):
    with pytest.raises(MethodSpecError, match="max_ratio must be a number in"):
        PMoD(max_ratio=1.2)
    with pytest.raises(MethodSpecError, match=r"min_ratio=0\.5 is above max_ratio=0\.3"):
        PMoD(max_ratio=0.3, min_ratio=0.5)
    with pytest.raises(MethodSpecError, match=r"routers must be the path of an \.npz"):
        PMoD(routers="routers.bin")
    with pytest.raises(MethodSpecError, match="has no MoD layer"):
        PMoD().plan(PlanInput(1, 4, 16, 10, 20, 4, 64))
    with pytest.raises(MethodSpecError, match="does not exist"):
        tokensieve.export("hf:llava-tiny", f"pmod(routers='{tmp_path / 'none.npz'}')", out=tmp_path / "out")
    random_routers(tmp_path / "r.npz", [2], 64)
    with pytest.raises(MethodSpecError, match=r"lacks model\.layers\.1\.router\.router\.weight"):
        load_routers(str(tmp_path / "r.npz"), [1], 64)
    with pytest.raises(MethodSpecError, match="hidden size is 32"):
        load_routers(str(tmp_path / "r.npz"), [2], 32)
    assert not (tmp_path / "out").exists()
