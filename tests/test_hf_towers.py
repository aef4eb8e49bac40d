"""More Hugging Face vision towers from local configs (``hf:PATH``): DINOv3 (rotary tables passed to every layer,
registers), AIMv2 (attention-pooling head), BEiT and Data2Vec-vision (relative position biases: each layer's own and
the model's shared one). Top-k and ToMe against the eager reference on values and kept tokens / merge maps, with
the position tables and biases following the tokens in later blocks; lint-clean for TensorRT 10.3. SigLIP2 (NaFlex
patch input) is refused with a typed error."""

import onnx_ir as ir
import pytest
from helpers import check_staged, export_and_check

import tokensieve
from tokensieve.errors import SourceError

OUTPUTS = {
    "dinov3": ["last_hidden_state", "pooler_output"],
    "aimv2": ["last_hidden_state", "pooler_output"],  # pooler: the attention-pooling head (log-size bias on merges)
    "beit": ["last_hidden_state", "pooler_output"],  # pooler: mean of the patch tokens (size-weighted on merges)
    "data2vec_vision": ["last_hidden_state"],  # no pooling layer
}
SPECIALS = {"dinov3": 5, "aimv2": 0, "beit": 1, "data2vec_vision": 1}
FOLLOWS = {"dinov3": "tokensieve.rope", "beit": "tokensieve.relpos", "data2vec_vision": "tokensieve.relpos"}


@pytest.mark.parametrize("method", ["topk(keep=0.6, layers=[0, 1])", "tome(r=6)"])
@pytest.mark.parametrize("family", ["dinov3", "aimv2", "beit", "data2vec_vision"])
def test_tower_parity(zoo, hf_config_dir, tmp_path, family, method):
    artifact = export_and_check(zoo(f"hf:{hf_config_dir(family)}", batch=2), method, tmp_path / "a")
    assert artifact.manifest.layout["specials"] == SPECIALS[family]
    assert [o["name"] for o in artifact.manifest.outputs] == OUTPUTS[family]
    if family in FOLLOWS:  # every block after the first site reads its tables / biases at the tokens' positions
        graph = ir.load(artifact.graph_path())
        rewired = {n.metadata_props[FOLLOWS[family]] for n in graph.graph if FOLLOWS[family] in n.metadata_props}
        assert rewired == {str(i) for i in range(artifact.manifest.sites[0]["layer"] + 1, 3)}


def test_siglip2_refused(tmp_path):
    """SigLIP2's NaFlex input (patch sequences, pixel mask, spatial shapes): a typed error with the reason and what
    to use instead, nothing written."""
    config = tmp_path / "config.json"
    config.write_text('{"model_type": "siglip2_vision_model", "hidden_size": 64, "num_hidden_layers": 2}')
    out = tmp_path / "a"
    with pytest.raises(SourceError, match=r"variable-length patch sequences.*Use hf:siglip"):
        tokensieve.export(f"hf:{config}", "topk(keep=0.5, layers=[0])", out)
    assert not out.exists()


def test_dynamic_batch(zoo, hf_config_dir, tmp_path):
    """A dynamic batch: DINOv3's rotary tables are found next to the symbolic batch axis and follow the tokens, in
    the single graph (top-k) and in ATP's bucketed stage graphs (tables that skip the 5 special tokens)."""
    entry = zoo(f"hf:{hf_config_dir('dinov3')}", dynamic_batch=True)
    export_and_check(entry, "topk(keep=0.6, layers=[0, 1])", tmp_path / "a", batch=2)
    staged = tokensieve.export(str(entry[0]), "atp(threshold=0.5, layers=[1])", tmp_path / "b", buckets=[18, 36])
    check_staged(staged, entry[1], batch=2)


def test_beit_dynamic_batch(zoo, hf_config_dir, tmp_path):
    """BEiT with a dynamic batch (ATP's stage graphs): transformers adds its all-true mask, as +1 on every logit, to
    the position biases; the term is dropped (constant along the keys), the biases follow the kept tokens."""
    entry = zoo(f"hf:{hf_config_dir('beit')}", dynamic_batch=True)
    staged = tokensieve.export(str(entry[0]), "atp(threshold=0.5, layers=[1])", tmp_path / "a", buckets=[18, 36])
    check_staged(staged, entry[1], batch=2)
    model = ir.load(staged.path / "stage2_b18.onnx")
    assert {n.metadata_props["tokensieve.relpos"] for n in model.graph if "tokensieve.relpos" in n.metadata_props} == {
        "2"
    }
