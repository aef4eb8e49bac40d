"""The Qwen2-VL / Qwen2.5-VL vision tower as ONNX graphs for still images: one static graph per bucket grid and
one with a symbolic patch count.

Hugging Face's tower computes its index tables from ``grid_thw`` with Python loops and ``.tolist()`` and, unless
flash attention is on, splits the sequence at ``cu_seqlens`` into one attention call per window: data-dependent
shapes that pin the export to the example's grid. ``VisionGraph`` runs the tower's own modules (patch embedding,
rotary embedding, each block's norms, ``qkv`` / ``proj`` and MLP, the merger) on tables it is given instead
(``runtimes/qwen_vision.py``): the window permutation is a ``Gather``, windowed attention is one attention over
the image with an additive block-diagonal mask (0 within a window, the float32 minimum across windows) built from
the window ids, and full attention needs no mask for one image. ``BucketGraph`` folds one grid's tables into the
graph as constants (static shapes, nothing data-dependent: what TensorRT wants); the dynamic graph takes them as
inputs (for ONNX Runtime: any grid, the host computes the tables).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch
from torch import nn

from tokensieve.converters.init import pretrained_or_random
from tokensieve.converters.qwen_vl import QWEN_VL_PRESETS, QWEN_VL_TYPES, host_config, qwen_vl_config
from tokensieve.runtimes.qwen_vision import grid_tables

OUTPUT = "image_features"


def build_qwen_vl(name: str, seed: int = 0) -> tuple[nn.Module, dict]:
    """``(eager model, host facts)`` of a preset (seeded random weights) or a local checkpoint directory."""
    import transformers

    config, processor = qwen_vl_config(name)
    cls = getattr(transformers, QWEN_VL_TYPES[config.model_type])
    model = pretrained_or_random(cls, config, None if name in QWEN_VL_PRESETS else Path(name), seed)
    return model.eval(), host_config(config, processor)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def _attention(attn: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask) -> torch.Tensor:
    """The tower's attention on ``x [N, C]`` over the whole sequence, ``mask [N, N]`` additive or None."""
    tokens = x.shape[0]
    q, k, v = attn.qkv(x).reshape(tokens, 3, attn.num_heads, -1).permute(1, 2, 0, 3).unbind(0)  # [H, N, d]
    q, k = (t * cos + _rotate_half(t) * sin for t in (q, k))
    scores = torch.matmul(q, k.transpose(1, 2)) * attn.scaling
    if mask is not None:
        scores = scores + mask
    out = torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32), v)
    return attn.proj(out.transpose(0, 1).reshape(tokens, -1))


class VisionGraph(nn.Module):
    """``tower`` on one still image, its tables as arguments (see the module docstring)."""

    def __init__(self, tower: nn.Module):
        super().__init__()
        self.tower = tower
        full = getattr(tower.config, "fullatt_block_indexes", None)
        self.windowed = [full is not None and i not in full for i in range(len(tower.blocks))]
        self.unit = tower.config.spatial_merge_size**2

    def _group(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Rows of ``x`` in the order of the merged tokens ``index`` (each token's ``unit`` patches together)."""
        return x.reshape(-1, self.unit, x.shape[-1])[index].reshape(-1, x.shape[-1])

    def forward(self, pixel_values, positions, window_index=None, window_ids=None, reverse=None):
        x = self.tower.patch_embed(pixel_values)
        cos, sin = self.tower.rotary_pos_emb(x, positions)
        mask = None
        if window_index is not None:
            x, cos, sin = (self._group(t, window_index) for t in (x, cos, sin))
            ids = window_ids.repeat_interleave(self.unit)
            mask = torch.where(ids[:, None] == ids[None, :], 0.0, torch.finfo(torch.float32).min)
        for block, windowed in zip(self.tower.blocks, self.windowed, strict=True):
            x = x + _attention(block.attn, block.norm1(x), cos, sin, mask if windowed else None)
            x = x + block.mlp(block.norm2(x))
        merged = self.tower.merger(x)
        return merged if reverse is None else merged[reverse]


class BucketGraph(nn.Module):
    """``VisionGraph`` on one grid with the grid's tables as constants: ``pixel_values -> image_features``."""

    def __init__(self, graph: VisionGraph, tables: dict[str, np.ndarray]):
        super().__init__()
        self.vision, self.names = graph, list(tables)
        for name, table in tables.items():
            self.register_buffer(name, torch.from_numpy(table), persistent=False)

    def forward(self, pixel_values):
        return self.vision(pixel_values, **{name: getattr(self, name) for name in self.names})


def example_pixels(grid: tuple[int, int], host: dict, seed: int = 0) -> np.ndarray:
    """Random normalised ``pixel_values`` of a grid (the export example and the parity input)."""
    width = 3 * host["temporal_patch_size"] * host["patch_size"] ** 2
    return np.random.default_rng(seed).standard_normal((grid[0] * grid[1], width)).astype(np.float32)


def export_bucket(tower: nn.Module, host: dict, grid: tuple[int, int], opset: int = 18) -> ir.Model:
    """The static graph of one bucket grid."""
    from tokensieve.converters.export import export_graph  # looked up per call (tests memoise the exporter)

    module = BucketGraph(VisionGraph(tower), grid_tables(grid, host))
    example = torch.from_numpy(example_pixels(grid, host))
    return export_graph(module, (example,), ["pixel_values"], [OUTPUT], opset=opset)


def export_dynamic(tower: nn.Module, host: dict, grid: tuple[int, int], opset: int = 18) -> ir.Model:
    """The graph with a symbolic patch count (``4*tokens`` patches for ``tokens`` merged tokens), tables as
    inputs; ``grid`` is the example's."""
    from tokensieve.converters.export import export_graph

    tables = grid_tables(grid, host)
    unit = host["merge_size"] ** 2
    args = (torch.from_numpy(example_pixels(grid, host)), *(torch.from_numpy(t) for t in tables.values()))
    names = ["pixel_values", *tables]
    axes = {name: {0: f"{unit}*tokens"} for name in ("pixel_values", "positions")}
    axes |= {name: {0: "tokens"} for name in ("window_index", "window_ids", "reverse") if name in tables}
    return export_graph(VisionGraph(tower), args, names, [OUTPUT], opset=opset, dynamic_axes=axes)
