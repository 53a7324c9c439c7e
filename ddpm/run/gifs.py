"""Animated GIFs of image frames (a sampler's trajectory): the training job's ``RUN_DIR/samples/*.gif``, and
the one GIF writer any figure can build on.

Frames are drawn pixel-exact: each uint8 frame (a grid from :func:`ddpm.data.images.make_grid`, say) is
upscaled by an integer factor with nearest-neighbour, optionally under a caption band, and written
atomically (a killed job never leaves half a GIF). Grayscale frames stay grayscale; colour frames get an
adaptive palette each.
"""
from pathlib import Path

import numpy as np

from ddpm.run.atomic import atomic_path

CAPTION_PX = 22  # height of the caption band above each frame


def _font(size: int):
    from matplotlib.font_manager import FontProperties, findfont
    from PIL import ImageFont

    return ImageFont.truetype(findfont(FontProperties(family="DejaVu Sans")), size)


def write_gif(path, frames: list[np.ndarray], *, scale: int = 2, frame_ms: int = 80, hold_ms: int = 1500,
              captions: list[str] | None = None) -> dict:
    """Write ``frames`` (uint8 (H, W, 1 | 3) each, all the same size) as a looping GIF at ``path``.

    Each frame shows ``frame_ms`` milliseconds, the last one ``hold_ms``; ``captions`` (one line per frame)
    are drawn centred above the frames. Returns {"file", "frames", "size": [w, h]} (px of the GIF).
    """
    from PIL import Image, ImageDraw

    if not frames or any(f.dtype != np.uint8 or f.ndim != 3 or f.shape != frames[0].shape for f in frames):
        raise ValueError("write_gif expects uint8 (H, W, 1|3) frames of one size")
    if captions is not None and len(captions) != len(frames):
        raise ValueError(f"{len(captions)} captions for {len(frames)} frames")
    gray = frames[0].shape[2] == 1
    font = _font(12) if captions else None
    # As wide as the widest caption: a narrow grid (one sample per row) must not cut it.
    width = max([frames[0].shape[1] * scale] + [int(font.getlength(c)) + 8 for c in captions or []])
    images = []
    for i, frame in enumerate(frames):
        big = (frame[:, :, 0] if gray else frame).repeat(scale, 0).repeat(scale, 1)
        img = Image.fromarray(big, "L" if gray else "RGB")
        if captions:
            band = Image.new(img.mode, (width, img.height + CAPTION_PX), 255 if gray else (255, 255, 255))
            band.paste(img, ((width - img.width) // 2, CAPTION_PX))
            ImageDraw.Draw(band).text((width / 2, CAPTION_PX / 2), captions[i], fill=0 if gray else (0, 0, 0),
                                      font=font, anchor="mm")
            img = band
        images.append(img if gray else img.convert("P", palette=Image.ADAPTIVE))
    durations = [frame_ms] * (len(images) - 1) + [hold_ms]
    with atomic_path(path) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=durations, loop=0)
    return {"file": Path(path).name, "frames": len(images), "size": list(images[0].size)}
