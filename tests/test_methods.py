import json
from fractions import Fraction

import pytest

from tokensieve.errors import MethodSpecError
from tokensieve.methods import DiffRate, PiToMe, ToMe, TopKPrune, describe, methods_from_dicts, parse_methods, schedule


def one(text):
    (method,) = parse_methods(text)
    return method


def test_parse_topk_exact_keep():
    method = one("topk(keep=0.7, layers=[3,6,9])")
    assert method == TopKPrune(keep=Fraction(7, 10), layers=(3, 6, 9))
    assert methods_from_dicts([method.to_dict()]) == [method]


@pytest.mark.parametrize("text", [None, "", "none", "None", " none "])
def test_none_means_no_method(text):
    assert parse_methods(text) == []


def test_composite_round_trip():
    methods = parse_methods("topk(keep=0.7, layers=[3]) + tome(r=8, layers=[4,5,6]) + pitome(ratio=0.9, layers=[9])")
    assert [m.name for m in methods] == ["topk", "tome", "pitome"]
    assert methods_from_dicts([m.to_dict() for m in methods]) == methods
    assert (
        describe(methods) == "topk(keep=0.7, layers=[3]) + tome(r=8, layers=[4, 5, 6]) + pitome(ratio=0.9, layers=[9])"
    )


def test_kept_count_is_exact_integer_arithmetic():
    method = TopKPrune(keep=Fraction(7, 10))
    # float ceil(0.7 * 10) is 8 (0.7 * 10 == 7.000000000000001); the exact count is 7
    assert method.kept_count(10) == 7
    assert method.kept_count(196) == 138
    half = TopKPrune(keep=Fraction(1, 2))
    assert [half.kept_count(n) for n in (1, 2, 3, 97)] == [1, 1, 2, 49]


def test_schedule_matches_evit_deit_small():
    # docs/methods.md#top-k: DeiT-S@224, keep 0.7: 197 -> 139 -> 98 -> 69 (no fusion); 197 -> 140 -> 100 -> 72 (fusion)
    plan = schedule(parse_methods("topk(keep=0.7)"), 197, 1, 12)
    assert [c.tokens_out for _, c in plan.sites] == [139, 98, 69]
    assert plan.entering == [197] * 4 + [139] * 3 + [98] * 3 + [69] * 2
    fused = schedule(parse_methods("topk(keep=0.7, fuse=true)"), 197, 1, 12)
    assert [c.tokens_out for _, c in fused.sites] == [140, 100, 72]


def test_tome_schedules_match_tome():
    # docs/methods.md#tome: ViT-S/16@224, r=16 -> 181, 165, ..., 21, 11; r=13 -> 184, ..., 41
    plan = schedule([ToMe(r=16)], 197, 1, 12)
    assert [c.tokens_out for _, c in plan.sites] == [181, 165, 149, 133, 117, 101, 85, 69, 53, 37, 21, 11]
    assert [c.tokens_out for _, c in schedule([ToMe(r=13)], 197, 1, 12).sites][::11] == [184, 41]
    # (r, inflection): ToMe's parse_r arithmetic
    assert ToMe(r=8, inflection=-1).r_schedule(12) == {
        i: v for i, v in enumerate([16, 14, 13, 11, 10, 8, 7, 5, 4, 2, 1, 0])
    }
    decreasing = schedule([ToMe(r=8, inflection=-1)], 197, 1, 12)
    assert [c.layer for _, c in decreasing.sites] == list(range(11))  # r = 0 at the last block: no site
    assert ToMe(r=[4, 4]).r_schedule(12) == {0: 4, 1: 4, **{i: 0 for i in range(2, 12)}}


def test_pitome_counts_follow_the_official_float_expression():
    plan = schedule([PiToMe(ratio=0.9)], 197, 1, 12)
    assert plan.sites[0][1].params["r"] == 19  # floor(196 - 196 * 0.9) = floor(19.6)
    assert PiToMe(ratio=0.9).margin_for(6, 12) == pytest.approx(0.45)
    assert PiToMe(ratio=0.9, margin=[0.5, 0.4], layers=[0, 1]).margin_for(1, 12) == 0.4


def test_pitome_bsm_halves_split_like_the_official_patches():
    first = schedule([PiToMe(ratio=0.9, bsm_layers="first_half")], 197, 1, 11)
    assert [c.params.get("bsm", 0) for _, c in first.sites] == [1] * 6 + [0] * 5  # ceil(11 / 2) BSM blocks
    second = schedule([PiToMe(ratio=0.9, bsm_layers="second_half")], 197, 1, 11)
    assert [c.params.get("bsm", 0) for _, c in second.sites] == [0] * 6 + [1] * 5
    assert describe(parse_methods("pitome(ratio=0.9, bsm_layers=[0, 2])")) == "pitome(ratio=0.9, bsm_layers=[0, 2])"
    again = methods_from_dicts([PiToMe(ratio=0.9, bsm_layers="first_half").to_dict()])[0]
    assert again == PiToMe(ratio=0.9, bsm_layers="first_half")


def test_diffrate_table_and_file(tmp_path):
    prune = [197, 196, 190, 168, 150, 139, 129, 117, 99, 78, 58, 3]
    merge = [197, 194, 176, 156, 141, 133, 121, 107, 88, 64, 56, 3]
    plan = schedule([DiffRate(prune=prune, merge=merge)], 197, 1, 12)
    assert [c.layer for _, c in plan.sites] == list(range(1, 12))  # block 0 changes nothing
    assert plan.entering[-1] == 56 and plan.sites[-1][1].tokens_out == 3
    table = tmp_path / "compression_rate.json"
    entry = {"prune_kept_num": str(prune), "merge_kept_num": str(merge)}
    table.write_text(json.dumps({"ViT-S-DeiT": {"2.9": entry}}))
    loaded = one(f"diffrate(table='{table}', key='ViT-S-DeiT/2.9')")
    assert loaded.prune == tuple(prune) and loaded.merge == tuple(merge)
    with pytest.raises(MethodSpecError, match=r"has no entry '3\.1'"):
        one(f"diffrate(table='{table}', key='ViT-S-DeiT/3.1')")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("topk(keep=0)", "keep must be in (0, 1]"),
        ("topk(keep=1.5)", "keep must be in (0, 1]"),
        ("topk(keep=-0.5)", "keep must be in (0, 1]"),
        ("topk(keep='a')", "keep must be a number"),
        ("topk()", "missing argument"),
        ("topk(keep=0.5, layers=[])", "non-empty list"),
        ("topk(keep=0.5, layers=[1,1])", "duplicates"),
        ("topk(keep=0.5, layers=[-1])", "non-negative"),
        ("topk(keep=0.5, fuse='max')", "fuse must be"),
        ("topk(keep=0.5, score='max')", "score must be"),
        ("topk(keep=0.5, bogus=1)", "unknown argument"),
        ("merge(r=8)", "unknown method"),
        ("topk(0.5)", "by keyword"),
        ("topk(keep=__import__('os').system('true'))", "not a literal"),
        ("topk(keep=0.5", "cannot parse"),
        ("tome(r=-1)", "non-negative int"),
        ("tome(r=[4, 4], inflection=0.5)", "inflection applies to an int r"),
        ("tome(r=8, inflection=2)", "inflection must be in [-1, 1]"),
        ("pitome(ratio=1.5)", "ratio (fraction kept per block) must be in (0, 1]"),
        ("pitome(ratio=0.9, bsm_layers='early')", "bsm_layers must be a list of block indices, 'first_half'"),
        ("diffrate()", "give prune=[...] and merge=[...]"),
        ("diffrate(prune=[197, 100], merge=[197, 120])", "merges to 120 tokens, more than the 100 it keeps"),
        ("diffrate(table='/nonexistent.json')", "cannot read diffrate: the table"),
    ],
)
def test_bad_method_strings(text, message):
    escaped = "".join("\\" + c if c in "()[]." else c for c in message)
    with pytest.raises(MethodSpecError, match=escaped):
        parse_methods(text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("topk(keep=0.5, layers=[3, 12])", r"layer 12 is out of range; this model has 12 blocks"),
        ("tome(r=120)", r"r=120 is larger than the tokens allow: at most 98"),
        ("tome(r=[1,1,1,1,1,1,1,1,1,1,1,1,1])", r"the r schedule has 13 entries but the method owns 12 blocks"),
        ("diffrate(prune=[197, 150], merge=[197, 140])", r"the table has 2 entries but the model has 12 blocks"),
        (
            f"diffrate(prune={[257] * 12}, merge={[257] * 12})",
            r"the table starts with 257 tokens but the model has 197",
        ),
        ("topk(keep=0.5, layers=[3]) + tome(r=4)", r"block 3 is claimed by both topk and tome"),
        ("pitome(ratio=0.9, margin=[0.5, 0.4])", r"2 margins given for 12 blocks"),
        ("pitome(ratio=0.9, layers=[6,7], bsm_layers=[5,6])", r"bsm_layers \[5\] are not blocks the method owns"),
    ],
)
def test_methods_that_do_not_fit_the_model(text, message):
    with pytest.raises(MethodSpecError, match=message):
        schedule(parse_methods(text), 197, 1, 12)


def test_cls_score_needs_a_cls_token():
    with pytest.raises(MethodSpecError, match="needs a CLS token"):
        one("topk(keep=0.5, score='cls')").resolved_score(0)
    assert one("topk(keep=0.5)").resolved_score(0) == "mean_received"
