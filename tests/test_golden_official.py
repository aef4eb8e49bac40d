"""The eager references against tensors produced by the official ToMe, PiToMe and DiffRate merge functions on
seeded synthetic inputs (tests/golden/make_official_golden.py regenerates them from the official checkouts)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from tokensieve.methods import DiffRate, PiToMe, ToMe
from tokensieve.methods.base import schedule
from tokensieve.parity.image import assignment
from tokensieve.reference import diffrate, pitome, tome
from tokensieve.reference.adapters import AttentionTensors
from tokensieve.reference.sites import SiteContext

GOLDEN = {k: torch.from_numpy(v) for k, v in np.load(Path(__file__).parent / "golden" / "official_merging.npz").items()}


def _context(method, tokens):
    ((_, count),) = schedule([method], tokens, 1, 1).sites
    return SiteContext(count, method, specials=1, depth=1)


def _official_assign(source: torch.Tensor) -> np.ndarray:
    return source.argmax(dim=1).numpy()  # output token that each input token ends up in


def _keys(metric):
    return AttentionTensors(
        query=torch.zeros(metric.shape[0], 1, metric.shape[1], metric.shape[2]), key=metric[:, None], scale=1.0
    )


@pytest.mark.parametrize(
    ("name", "method", "site_fn"),
    [
        ("tome", ToMe(r=7, layers=(0,)), tome.site),
        ("pitome", PiToMe(ratio=0.8, margin=(0.45,), layers=(0,)), pitome.site),
        ("pitome_bsm", PiToMe(ratio=0.8, margin=(0.45,), layers=(0,), bsm_layers=(0,)), pitome.site),
    ],
)
def test_merge_matches_official(name, method, site_fn):
    x, metric, size = GOLDEN["x"], GOLDEN["metric"], GOLDEN["size"]
    context = _context(method, x.shape[1])
    result = site_fn(x, _keys(metric), size, context)
    torch.testing.assert_close(result.stream, GOLDEN[f"{name}_x"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result.sizes, GOLDEN[f"{name}_size"], rtol=1e-5, atol=1e-5)
    site = {
        "method": method.name,
        "tokens_in": x.shape[1],
        "tokens_out": context.count.tokens_out,
        "params": context.count.params,
    }
    ours = assignment(site, 1, {k: v.numpy() for k, v in result.record.items()})
    np.testing.assert_array_equal(ours, _official_assign(GOLDEN[f"{name}_source"]))


def test_diffrate_merge_matches_official():
    x, size = GOLDEN["x"], GOLDEN["size"]
    batch, n, _ = x.shape
    kept = int(GOLDEN["diffrate_kept"])
    # attention whose CLS row strictly decreases with the token index: the CLS-attention sort is the identity,
    # so the site's merge stage sees exactly the official function's input
    query = torch.zeros(batch, 1, n, 4)
    query[:, :, 0, 0] = 1.0
    key = torch.zeros(batch, 1, n, 4)
    key[:, 0, :, 0] = torch.arange(n, 0, -1, dtype=torch.float32)
    method = DiffRate(prune=(n,), merge=(kept,))
    result = diffrate.site(x, AttentionTensors(query, key, 1.0), size, _context(method, n))
    assert result.record["order"].tolist() == [list(range(n - 1))] * batch
    torch.testing.assert_close(result.stream, GOLDEN["diffrate_x"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result.sizes, GOLDEN["diffrate_size"], rtol=1e-5, atol=1e-5)
