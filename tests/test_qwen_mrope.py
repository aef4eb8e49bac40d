"""mRoPE position ids in numpy (``runtimes/mrope.py``) against the model's ``get_rope_index`` and its decode-time
positions, on tiny random Qwen2.5-VL and Qwen2-VL configs."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers

from tokensieve.converters.qwen_vl import QWEN_VL_TYPES, SPECIAL_TOKENS, host_config, qwen_vl_config
from tokensieve.errors import InputError
from tokensieve.runtimes.mrope import decode_positions, rope_index, token_types

TEXT = len(SPECIAL_TOKENS) + 40  # a byte token
START, END = SPECIAL_TOKENS.index("<|vision_start|>"), SPECIAL_TOKENS.index("<|vision_end|>")


@pytest.fixture(scope="module", params=["qwen2.5-vl-tiny", "qwen2-vl-tiny"])
def family(request):
    config, processor = qwen_vl_config(request.param)
    model = getattr(transformers, QWEN_VL_TYPES[config.model_type])(config).eval().model
    return model, host_config(config, processor)


def _prompt(host, spans):
    """Text, then for each ``(kind, tokens)`` a vision span between start / end tokens, then text."""
    ids = [TEXT] * 3
    for kind, tokens in spans:
        ids += [START] + [host[f"{kind}_token_id"]] * tokens + [END] + [TEXT] * 2
    return ids


def _hf(model, host, ids, images=(), videos=(), seconds=None):
    tensor = torch.tensor([ids])
    positions, delta = model.get_rope_index(
        tensor,
        mm_token_type_ids=torch.from_numpy(token_types(ids, host))[None],
        image_grid_thw=torch.tensor(images) if images else None,
        video_grid_thw=torch.tensor(videos) if videos else None,
        second_per_grid_ts=torch.tensor(seconds) if seconds else None,
    )
    return positions[:, 0].numpy(), int(delta[0, 0])


@pytest.mark.parametrize(
    "images, videos, seconds",
    [
        ([], [], None),  # text only
        ([(1, 6, 10)], [], None),  # one image, wider than high
        ([(1, 8, 4), (1, 4, 4)], [], None),  # two images
        ([(1, 6, 4)], [(3, 4, 6)], [1.3]),  # a video: Qwen2.5-VL spaces its frames by tokens_per_second
    ],
)
def test_positions_are_the_models(family, images, videos, seconds):
    model, host = family
    spans = [("image", t * h * w // 4) for t, h, w in images] + [("video", t * h * w // 4) for t, h, w in videos]
    ids = _prompt(host, spans)
    positions, delta = rope_index(ids, host, images, videos, seconds)
    expected, expected_delta = _hf(model, host, ids, images, videos, seconds)
    assert np.array_equal(positions, expected) and delta == expected_delta
    if images:  # the token after an image continues after its largest spatial position
        assert positions[0, 3 + 1 + images[0][1] * images[0][2] // 4] == 4 + max(images[0][1:]) // 2


def test_still_images_ignore_the_frame_spacing(family):
    _, host = family
    ids = _prompt(host, [("image", 6)])
    assert np.array_equal(rope_index(ids, host, [(1, 4, 6)])[0], rope_index(ids, {**host, "tokens_per_second": 50},
                                                                        [(1, 4, 6)])[0])  # fmt: skip


def test_decode_positions_are_the_models(family):
    """After the prompt the model adds the rope delta to the unreduced sequence index."""
    model, host = family
    ids = _prompt(host, [("image", 15)])
    _, delta = rope_index(ids, host, [(1, 6, 10)])
    model.rope_deltas = torch.tensor([[delta]])
    for step in (len(ids), len(ids) + 5):
        cache = SimpleNamespace(get_seq_length=lambda step=step: step)
        nothing = dict.fromkeys(["input_ids", "image_grid_thw", "video_grid_thw", "attention_mask"])
        expected = model.compute_3d_position_ids(**nothing, inputs_embeds=torch.zeros(1, 1, 8), cache=cache)
        assert np.array_equal(decode_positions(step, delta), expected[:, 0].numpy())
    model.rope_deltas = None


def test_a_prompt_that_does_not_match_its_grids_is_refused(family):
    _, host = family
    with pytest.raises(InputError, match="does not match the next grid"):
        rope_index(_prompt(host, [("image", 5)]), host, [(1, 6, 10)])
    with pytest.raises(InputError, match="does not match the next grid"):
        rope_index(_prompt(host, [("image", 15)]), host, [])
