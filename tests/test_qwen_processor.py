"""Qwen2-VL / Qwen2.5-VL host side in numpy against Hugging Face: the image processor's resize, normalisation and
patch order (bit for bit), the resize to a bucket grid, and the processor's prompt expansion."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from torchvision.transforms.v2 import functional as tvf

from tokensieve.converters.llava import OPENAI_CLIP
from tokensieve.errors import InputError
from tokensieve.runtimes.qwen_image import expand_prompt, preprocess
from tokensieve.runtimes.resample import resize_bicubic

LOW, HIGH = 128 * 28 * 28, 512 * 28 * 28
HOST = {
    "patch_size": 14,
    "merge_size": 2,
    "temporal_patch_size": 2,
    "min_pixels": LOW,
    "max_pixels": HIGH,
    "mean": list(OPENAI_CLIP[0]),
    "std": list(OPENAI_CLIP[1]),
    "image_token": "<|image_pad|>",
}
SPECIAL = ["<unk>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"]


def _image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Noise over a smooth gradient: sharp edges (where fixed-point rounding shows) and flat regions."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 200, width)[None, :, None] + np.linspace(0, 50, height)[:, None, None]
    return np.clip(ramp + rng.integers(0, 56, (height, width, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def processor():
    return transformers.Qwen2VLImageProcessor(min_pixels=LOW, max_pixels=HIGH)


def test_the_auto_processor_is_the_torchvision_one():
    """What the auto classes pick for Qwen-VL checkpoints, hence the resize this host reproduces."""
    assert issubclass(transformers.Qwen2VLImageProcessor, transformers.image_processing_backends.TorchvisionBackend)
    assert transformers.Qwen2VLImageProcessor.resample == transformers.image_utils.PILImageResampling.BICUBIC


@pytest.mark.parametrize("size", [(240, 320), (333, 500), (1000, 200), (64, 64), (900, 1400), (448, 448)])
def test_pixel_values_are_the_processors(processor, size):
    """Bit-exact: (64, 64) is below min_pixels (scaled up), (900, 1400) above max_pixels (scaled down), (448, 448)
    already fits (no resize), the others change aspect ratio and both sides."""
    image = _image(*size)
    expected = processor(images=[image], return_tensors="np")
    pixels, grid = preprocess(image, HOST)
    assert grid == tuple(expected["image_grid_thw"][0])
    assert np.array_equal(pixels, expected["pixel_values"])


def test_resize_is_torchs_uint8_kernel_on_random_sizes():
    rng = np.random.default_rng(1)
    for _ in range(12):
        height, width, new_height, new_width = (int(v) for v in rng.integers(3, 300, 4))
        image = _image(height, width, seed=int(rng.integers(1 << 30)))
        tensor = torch.from_numpy(image).permute(2, 0, 1)
        expected = tvf.resize(tensor, [new_height, new_width], interpolation=tvf.InterpolationMode.BICUBIC)
        assert np.array_equal(resize_bicubic(image, new_height, new_width), expected.permute(1, 2, 0).numpy())


def test_bucket_grid_is_the_processor_on_the_image_resized_to_it(processor):
    """A bucket resizes the image straight to the bucket's pixels; the processor leaves an image of a grid it would
    choose as it is, so both see the same pixels."""
    image = _image(333, 500)
    pixels, grid = preprocess(image, HOST, grid=(20, 30))
    resized = tvf.resize(torch.from_numpy(image).permute(2, 0, 1), [280, 420], tvf.InterpolationMode.BICUBIC)
    expected = processor(images=[resized.permute(1, 2, 0).numpy()], return_tensors="np")
    assert grid == (1, 20, 30) == tuple(expected["image_grid_thw"][0])
    assert np.array_equal(pixels, expected["pixel_values"])
    with pytest.raises(InputError, match="not a multiple of merge_size"):
        preprocess(image, HOST, grid=(15, 24))


def _tokenizer():
    words = ["describe", "the", "images", "and"]
    tokenizer = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(SPECIAL + words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>")


def test_prompt_expansion_is_the_processors(processor):
    tokenizer = _tokenizer()
    full = transformers.Qwen2_5_VLProcessor(
        image_processor=processor, tokenizer=tokenizer, video_processor=transformers.Qwen2VLVideoProcessor()
    )
    images = [_image(100, 200), _image(700, 280, seed=2)]
    span = "<|vision_start|><|image_pad|><|vision_end|>"
    text = f"describe {span} and {span} the images"
    expected = full(text=[text], images=images, return_tensors="np")
    grids = [preprocess(image, HOST)[1] for image in images]
    ids = tokenizer(expand_prompt(text, grids, HOST))["input_ids"]
    assert ids == expected["input_ids"][0].tolist()
    with pytest.raises(InputError, match=r"holds 2 \S+ tokens for 1 images"):
        expand_prompt(text, grids[:1], HOST)
