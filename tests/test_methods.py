from fractions import Fraction

import pytest

from tokensieve.errors import MethodSpecError
from tokensieve.methods import TopKPrune, method_from_dict, parse_method


def test_parse_topk_exact_keep():
    method = parse_method("topk(keep=0.7, layers=[3,6,9])")
    assert method == TopKPrune(keep=Fraction(7, 10), layers=(3, 6, 9))
    assert method.keep == Fraction(7, 10)
    assert method_from_dict(method.to_dict()) == method


@pytest.mark.parametrize("text", [None, "", "none", "None", " none "])
def test_none_means_no_method(text):
    assert parse_method(text) is None


def test_kept_count_is_exact_integer_arithmetic():
    method = TopKPrune(keep=Fraction(7, 10))
    # float ceil(0.7 * 10) is 8 (0.7 * 10 == 7.000000000000001); the exact count is 7
    assert method.kept_count(10) == 7
    assert method.kept_count(196) == 138
    half = TopKPrune(keep=Fraction(1, 2))
    assert [half.kept_count(n) for n in (1, 2, 3, 97)] == [1, 1, 2, 49]


def test_schedule_matches_evit_deit_small():
    # METHODS.md §3.5: DeiT-S@224, keep 0.7: 197 -> 139 -> 98 -> 69 (no fusion); 197 -> 140 -> 100 -> 72 (fusion)
    entering, sites = parse_method("topk(keep=0.7)").schedule(197, 1, 12)
    assert [s.tokens_out for s in sites] == [139, 98, 69]
    assert entering == [197] * 4 + [139] * 3 + [98] * 3 + [69] * 2
    _, fused = parse_method("topk(keep=0.7, fuse=true)").schedule(197, 1, 12)
    assert [s.tokens_out for s in fused] == [140, 100, 72]


def test_no_fused_token_when_nothing_is_pruned():
    _, sites = parse_method("topk(keep=1.0, layers=[2], fuse='sum')").schedule(197, 1, 12)
    assert sites[0].tokens_out == 197


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
    ],
)
def test_bad_method_strings(text, message):
    with pytest.raises(MethodSpecError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        parse_method(text)


def test_layer_out_of_range_names_the_depth():
    with pytest.raises(MethodSpecError, match=r"layer 12 is out of range; this model has 12 blocks"):
        parse_method("topk(keep=0.5, layers=[3, 12])").schedule(197, 1, 12)


def test_cls_score_needs_a_cls_token():
    method = parse_method("topk(keep=0.5, score='cls')")
    with pytest.raises(MethodSpecError, match="needs a CLS token"):
        method.resolved_score(0)
    assert parse_method("topk(keep=0.5)").resolved_score(0) == "mean_received"
