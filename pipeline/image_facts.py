"""What a checkpoint's image processor does to a photo, read once, in one place.

Every layout llava-ray runs uses one of three image processor classes, each as transformers' PIL
backend (`...Pil`) and, where torchvision is installed, its torchvision twin: CLIP (LLaVA-1.5:
shortest edge 336, centre crop), SigLIP (llava-interleave: squashed to 384 x 384, no crop) and
LLaVA-NeXT's AnyRes (a thumbnail and grid tiles from the best pinpoint resolution). Their
attributes differ (SigLIP has no `crop_size`), so the input size, crop or squash, resample,
pinpoints and the tokens per image are read here and nowhere else; pipeline/pixels.py, the
token counts of both backends and the start-up checks take an `ImageFacts`. A processor class or
setting outside these is a one-line ConfigError naming model.name at start, never a traceback.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

Size = tuple[int, int]  # (height, width)

# class name -> AnyRes (LLaVA-NeXT) or one tile (LLaVA)
PROCESSOR_CLASSES: dict[str, bool] = {
    "CLIPImageProcessor": False,
    "CLIPImageProcessorPil": False,
    "SiglipImageProcessor": False,
    "SiglipImageProcessorPil": False,
    "LlavaNextImageProcessor": True,
    "LlavaNextImageProcessorPil": True,
}


def _size(value: Any, key: str) -> int | None:
    """A SizeDict / dict entry, or None (transformers 5 keeps absent entries as None)."""
    if value is None:
        return None
    return value.get(key) if isinstance(value, dict) else getattr(value, key, None)


@dataclass(frozen=True)
class ImageFacts:
    processor_class: str
    anyres: bool
    resample: int
    shortest_edge: int | None  # resize so the shorter side is this long (aspect kept) ...
    resize_to: Size | None  # ... or squash to exactly this size
    crop: Size | None  # centre crop after the resize
    tile: Size  # what the vision tower takes: one LLaVA image, one AnyRes tile
    pinpoints: tuple[Size, ...]  # AnyRes resolutions; () for LLaVA
    patch_size: int  # the vision tower's patch
    extra_tokens: int  # CLS kept (+1 per image or tile) or dropped ('default' strategy)
    do_pad: bool
    do_resize: bool
    _processor: Any = field(repr=False, compare=False, default=None)

    @classmethod
    def read(cls, processor: Any, family: str, model_name: str) -> "ImageFacts":
        """The facts of `processor` (the checkpoint's AutoProcessor) for `family`."""
        ip = processor.image_processor
        name = type(ip).__name__
        if name not in PROCESSOR_CLASSES:
            raise ConfigError("model.name", f"{model_name!r} has image processor {name}; llava-ray knows {sorted(PROCESSOR_CLASSES)}")
        anyres = PROCESSOR_CLASSES[name]
        if anyres != (family == "llava_next"):
            raise ConfigError("model.name", f"{model_name!r} is a {family} checkpoint but its image processor is {name}")
        size, crop_size = ip.size, ip.crop_size
        shortest = _size(size, "shortest_edge")
        fixed = (_size(size, "height"), _size(size, "width"))
        resize_to = fixed if all(fixed) else None
        crop = (_size(crop_size, "height"), _size(crop_size, "width")) if ip.do_center_crop and crop_size else None
        if _size(size, "longest_edge") or not (shortest or resize_to):
            raise ConfigError("model.name", f"{model_name!r}: image processor size {dict(size)} is neither a shortest edge nor a height x width")
        if anyres:
            side = _size(crop_size, "height")
            if not side:
                raise ConfigError("model.name", f"{model_name!r}: {name} has no crop_size, the AnyRes tile")
            tile, pinpoints = (side, _size(crop_size, "width")), tuple(tuple(p) for p in ip.image_grid_pinpoints)
        else:
            tile = crop or resize_to
            if tile is None:
                raise ConfigError("model.name", f"{model_name!r}: {name} resizes to a shortest edge without a crop, so images "
                                  "would differ in tiles and tokens; llava-ray runs processors with one tile size")
            pinpoints = ()
        patch = getattr(processor, "patch_size", None)
        if not patch:
            raise ConfigError("model.name", f"{model_name!r}: the processor has no patch_size (processor_config.json)")
        extra = int(getattr(processor, "num_additional_image_tokens", 0) or 0)
        if getattr(processor, "vision_feature_select_strategy", None) == "default":
            extra -= 1
        return cls(
            processor_class=name, anyres=anyres, resample=ip.resample, shortest_edge=shortest, resize_to=resize_to,
            crop=crop, tile=tile, pinpoints=pinpoints, patch_size=int(patch), extra_tokens=extra,
            do_pad=bool(getattr(ip, "do_pad", False)), do_resize=bool(ip.do_resize), _processor=processor,
        )

    def tokens(self, sizes: list[Size]) -> list[int]:
        """Image tokens for images of these (height, width) sizes, as the processor expands them:
        LLaVA a fixed grid per image; NeXT the processor's own AnyRes count (unpadded features,
        newlines and the base tile), which depends on each image's size."""
        th, tw = self.tile
        if not self.anyres:
            return [(th // self.patch_size) * (tw // self.patch_size) + self.extra_tokens] * len(sizes)
        # _get_number_of_features counts the base tile's CLS once; 'default' drops it.
        base = self.extra_tokens - int(getattr(self._processor, "num_additional_image_tokens", 0) or 0)
        return [self._processor._get_number_of_features(h, w, th, tw) + base for h, w in sizes]

    def tiles(self, sizes: list[Size]) -> list[int]:
        """Tiles the vision tower runs per image: one for LLaVA; for AnyRes the base tile and the
        grid of the best pinpoint resolution, as the processor cuts them."""
        if not self.anyres:
            return [1] * len(sizes)
        from transformers.image_processing_utils import select_best_resolution  # no torch: CPU actors have none

        th, tw = self.tile
        best = (select_best_resolution(list(s), [list(p) for p in self.pinpoints]) for s in sizes)
        return [math.ceil(h / th) * math.ceil(w / tw) + 1 for h, w in best]

    @property
    def max_tokens(self) -> int:
        """The most tokens one image can take: a NeXT image the shape of its largest pinpoint
        (2928 for the 336-px CLIP tower), a LLaVA image its one grid (576 CLIP, 729 SigLIP)."""
        return max(self.tokens(list(self.pinpoints) or [self.tile]))

    def describe(self) -> str:
        how = "AnyRes" if self.anyres else ("resize + centre crop" if self.crop else "squash")
        return f"{self.processor_class} ({how}, {self.tile[0]}x{self.tile[1]} tiles, patch {self.patch_size})"
