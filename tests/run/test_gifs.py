"""ddpm.run.gifs: the GIF writer (frames, durations, colour and gray, captions, atomic, bad input)."""
import numpy as np
import pytest
from PIL import Image

from ddpm.run.gifs import CAPTION_PX, write_gif


def frames(n, channels, h=6, w=5):
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (h, w, channels), dtype=np.uint8) for _ in range(n)]


@pytest.mark.parametrize("channels", [1, 3])
def test_frames_are_upscaled_pixel_exact_and_the_last_is_held(tmp_path, channels):
    fs = frames(4, channels)
    fs[1] = fs[1] // 2 + 1  # no two frames alike (Pillow merges identical neighbours)
    info = write_gif(tmp_path / "a.gif", fs, scale=3, frame_ms=50, hold_ms=700)
    assert info == {"file": "a.gif", "frames": 4, "size": [15, 18]}
    with Image.open(tmp_path / "a.gif") as im:
        assert im.n_frames == 4 and im.size == (15, 18)
        durations = []
        for i in range(4):
            im.seek(i)
            durations.append(im.info["duration"])
            got = np.asarray(im.convert("RGB"))
            want = np.repeat(fs[i], 3, axis=2) if channels == 1 else fs[i]
            if channels == 1:  # a gray palette is exact; a colour one is quantised to 256 colours
                assert np.array_equal(got, want.repeat(3, 0).repeat(3, 1))
        assert durations == [50, 50, 50, 700]
    assert not list(tmp_path.glob("*.tmp"))


def test_captions_get_a_band_as_wide_as_the_widest(tmp_path):
    info = write_gif(tmp_path / "c.gif", frames(2, 1), scale=1, captions=["t=999", "a rather long caption · done"])
    w, h = info["size"]
    assert h == 6 + CAPTION_PX and w > 100  # a 5-px-wide frame, widened for its caption


@pytest.mark.parametrize("bad, captions", [([], None), ([np.zeros((2, 2, 2), np.uint8)], None),
                                           (frames(2, 1), ["one"]), ([np.zeros((2, 2, 1)), np.zeros((2, 2, 1))], None)])
def test_bad_frames_are_refused_and_nothing_is_written(tmp_path, bad, captions):
    with pytest.raises(ValueError):
        write_gif(tmp_path / "x.gif", bad, captions=captions)
    assert not list(tmp_path.iterdir())
