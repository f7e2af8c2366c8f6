"""Hugging Face vision towers as backbones: SigLIP2 NaFlex, Gemma 4's vision encoder, DINOv2, and Qwen2.5-VL's and
Qwen3-VL's vision towers, each around
the transformers model of its kind (registered in :mod:`.backbones`). Pretrained weights are read elsewhere
(:mod:`vlmtrain.model.pretrained`): an export builds a tower empty and fills it from its own files.
"""

from __future__ import annotations

import torch
from torch import nn

from .backbone import VisionBackbone, canvases, run_by_grid, run_in_bins, unit_pixels

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # DINOv2's processor
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # Qwen-VL's processors


class PixelNormalisation(nn.Module):
    """Pixels in [0, 1] per channel to ``(pixels - mean) / std`` (channels on dim 1), as a tower's processor
    normalises them; mean and std are non-persistent buffers (see :meth:`Rope2D.reset_buffers`)."""

    def __init__(self, mean: tuple[float, float, float], std: tuple[float, float, float]) -> None:
        super().__init__()
        self.values = (mean, std)
        self.register_buffer("mean", torch.empty(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.empty(1, 3, 1, 1), persistent=False)
        self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        self.mean.copy_(torch.tensor(self.values[0]).view(1, 3, 1, 1))
        self.std.copy_(torch.tensor(self.values[1]).view(1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels - self.mean.to(pixels.dtype)) / self.std.to(pixels.dtype)


class Siglip2Backbone(VisionBackbone):
    """SigLIP2 NaFlex: pixels normalised to [-1, 1], per-image ``spatial_shapes`` for its resized position table;
    its own attention mask over the padding of each bin of images (:func:`run_in_bins`)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.patch_size = model.config.patch_size
        self.width = model.config.hidden_size

    def forward(self, pixels: torch.Tensor, positions: torch.Tensor, patch_grids: torch.Tensor) -> torch.Tensor:
        dtype = self.model.embeddings.patch_embedding.weight.dtype

        def dense(images: torch.Tensor, places: torch.Tensor, grids: torch.Tensor) -> torch.Tensor:
            output = self.model(
                pixel_values=unit_pixels(images, dtype) * 2.0 - 1.0,
                pixel_attention_mask=places[..., 0] >= 0,
                spatial_shapes=grids,
            )
            return output.last_hidden_state

        return run_in_bins(pixels, positions, patch_grids, self.bins, self.width, dtype, dense)


class Gemma4Backbone(VisionBackbone):
    """Gemma 4's vision encoder up to (not including) its pooler.

    Features are scaled by sqrt(width) and standardized as Gemma 4 does after pooling; both are affine,
    so average pooling of these features equals Gemma4VisionModel's output exactly.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.patch_size = model.config.patch_size
        self.width = model.config.hidden_size

    def forward(self, pixels: torch.Tensor, positions: torch.Tensor, patch_grids: torch.Tensor) -> torch.Tensor:
        dtype = self.model.patch_embedder.input_proj.weight.dtype

        def dense(images: torch.Tensor, places: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
            padding = places[..., 0] < 0
            embeds = self.model.patch_embedder(unit_pixels(images, dtype), places, padding)
            return self.model.encoder(inputs_embeds=embeds, attention_mask=~padding, pixel_position_ids=places).last_hidden_state

        hidden = run_in_bins(pixels, positions, patch_grids, self.bins, self.width, torch.float32, dense) * self.width**0.5
        if self.model.config.standardize:
            hidden = (hidden - self.model.std_bias.float()) * self.model.std_scale.float()
        return hidden


class Dinov2Backbone(VisionBackbone):
    """DINOv2 (ImageNet-normalised pixels; its position table is interpolated to each grid). It takes whole
    images without a mask, so images run in groups of equal patch grid (as many calls as grids: under ZeRO-3,
    steps must then hold one grid, see the recipe rules); the class and register tokens are dropped, the
    patch tokens kept."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.patch_size = model.config.patch_size
        self.width = model.config.hidden_size
        self.normalise = PixelNormalisation(IMAGENET_MEAN, IMAGENET_STD)

    def forward(self, pixels: torch.Tensor, positions: torch.Tensor, patch_grids: torch.Tensor) -> torch.Tensor:
        dtype = self.model.embeddings.patch_embeddings.projection.weight.dtype
        skip = 1 + getattr(self.model.config, "num_register_tokens", 0)

        def dense(images: torch.Tensor, _: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
            canvas = canvases(images, grid, self.patch_size, dtype)
            return self.model(pixel_values=self.normalise(canvas)).last_hidden_state[:, skip:]

        return run_by_grid(pixels, positions, patch_grids, self.width, dtype, dense)




def merge_window_order(patch_grids: torch.Tensor, merge: int) -> torch.Tensor:
    """The packed patches (each image row-major) in Qwen-VL's order: each image's ``merge`` × ``merge`` windows
    row-major, the patches of a window row-major inside it (what its processor gives and its merger reads)."""
    orders, offset = [], 0
    for rows, cols in patch_grids.tolist():
        index = torch.arange(rows * cols, device=patch_grids.device).view(rows // merge, merge, cols // merge, merge)
        orders.append(index.permute(0, 2, 1, 3).reshape(-1) + offset)
        offset += rows * cols
    return torch.cat(orders) if orders else torch.zeros(0, dtype=torch.long, device=patch_grids.device)


class Qwen25VLBackbone(VisionBackbone):
    """Qwen2.5-VL's vision tower, its patch merger included: it pools 2x2 patches into a token and projects it to
    the LM's width itself (the model's pooling and projector pass its tokens through). Patches go in as Qwen's
    processors lay them out (normalised, each flattened as channel, frame, row, column over its temporal patch:
    an image repeated, a video's consecutive frames; in merge-window order); its tokens come out row-major,
    image after image."""

    normalisation = (CLIP_MEAN, CLIP_STD)

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.patch_size = model.config.patch_size
        self.merge = model.config.spatial_merge_size
        self.frames = model.config.temporal_patch_size
        self.width = model.config.out_hidden_size
        self.normalise = PixelNormalisation(*self.normalisation)

    def forward(self, pixels: torch.Tensor, positions: torch.Tensor, patch_grids: torch.Tensor) -> torch.Tensor:
        size, count = self.patch_size, pixels.shape[0]
        ordered = unit_pixels(pixels[merge_window_order(patch_grids, self.merge)], torch.float32)
        squares = self.normalise(ordered.view(-1, size, size, 3).permute(0, 3, 1, 2))  # every frame of every patch
        patches = squares.view(count, self.frames, 3, size, size).transpose(1, 2).reshape(count, -1)
        grid_thw = torch.cat([torch.ones_like(patch_grids[:, :1]), patch_grids], dim=1)
        dtype = self.model.patch_embed.proj.weight.dtype
        return self.tokens(self.model(patches.to(dtype), grid_thw=grid_thw))

    def tokens(self, output) -> torch.Tensor:
        """The visual tokens of the tower's output."""
        return output.pooler_output


class Qwen3VLBackbone(Qwen25VLBackbone):
    """Qwen3-VL's vision tower (as Qwen2.5-VL's; pixels normalised to [-1, 1]), its DeepStack features (the
    mergers of some of its blocks, added to the LM's first layers) after its tokens' columns."""

    normalisation = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # Qwen3-VL's processor

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.layer_features = len(model.config.deepstack_visual_indexes)

    def tokens(self, output) -> torch.Tensor:
        return torch.cat([output.pooler_output, *output.deepstack_features], dim=-1)


TOWER_BACKBONES = {
    backbone.__name__: backbone
    for backbone in (Siglip2Backbone, Gemma4Backbone, Dinov2Backbone, Qwen25VLBackbone, Qwen3VLBackbone)
}
