"""Image intake: every format and mode to RGB, EXIF orientation, and every bad-image class."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pixelray.images import ImageError, ImageLimits, decode_image, image_id
from pixelray.testing.images import bad_files, encode, png_header_only, random_rgb


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_formats_decode_to_rgb(fmt):
    src = random_rgb(37, 23)
    img = decode_image(encode(src, fmt))
    assert img.mode == "RGB" and img.size == (37, 23)
    if fmt in ("PNG", "BMP", "TIFF"):  # lossless
        assert np.array_equal(np.asarray(img), np.asarray(src))


def test_mode_L_and_1():
    gray = Image.fromarray(np.full((4, 5), 77, np.uint8), "L")
    assert np.all(np.asarray(decode_image(encode(gray, "PNG"))) == 77)
    bilevel = Image.new("1", (5, 4), 1)
    assert np.all(np.asarray(decode_image(encode(bilevel, "PNG"))) == 255)


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 255, 0))  # fully transparent blue -> white
    out = np.asarray(decode_image(encode(rgba, "PNG")))
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[1, 1]) == (255, 0, 0)

    la = Image.new("LA", (3, 3), (0, 0))  # black, fully transparent
    assert np.all(np.asarray(decode_image(encode(la, "PNG"))) == 255)


def test_palette_with_transparency():
    p = Image.new("P", (4, 4), 0)
    p.putpalette([0, 255, 0] + [255, 0, 0] * 255)
    p.putpixel((1, 1), 1)
    data = encode(p, "PNG", transparency=0)  # palette index 0 (green) is transparent
    assert Image.open(__import__("io").BytesIO(data)).mode == "P"
    out = np.asarray(decode_image(data))
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[1, 1]) == (255, 0, 0)


def test_cmyk_jpeg():
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    out = decode_image(encode(cmyk, "JPEG", quality=95))
    r, g, b = np.asarray(out)[4, 4].astype(int)
    assert out.mode == "RGB" and r > 200 and g < 60 and b < 60


def test_16_bit_grayscale_is_scaled_not_clipped():
    arr = np.array([[0, 32768, 65535]], dtype=np.uint16)
    img16 = Image.fromarray(arr)
    assert img16.mode == "I;16"
    out = np.asarray(decode_image(encode(img16, "PNG")))[0, :, 0]
    assert out[0] == 0 and 120 <= out[1] <= 135 and out[2] == 255


def test_exif_orientation_is_applied():
    src = Image.new("RGB", (40, 20), (255, 0, 0))
    src.paste((0, 0, 255), (20, 0, 40, 20))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img = decode_image(encode(src, "JPEG", exif=exif.tobytes(), quality=95))
    assert img.size == (20, 40)
    top, bottom = np.asarray(img)[5, 10], np.asarray(img)[35, 10]
    assert top[0] > 200 and top[2] < 60  # red now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_animated_gif_takes_first_frame():
    frames = [Image.new("RGB", (6, 6), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = __import__("io").BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    out = np.asarray(decode_image(buf.getvalue()))
    assert out[0, 0, 0] > 200 and out[0, 0, 2] < 60


@pytest.mark.parametrize("name", sorted(bad_files()))
def test_bad_files_raise_a_clear_error(name):
    data, kind = bad_files()[name]
    with pytest.raises(ImageError) as err:
        decode_image(data)
    assert err.value.code == kind
    assert str(err.value)  # a message for the errors table


def test_bomb_is_refused_before_decoding():
    # 10_000 x 10_000 claims 100 MP but carries a few bytes: refused from the header alone
    with pytest.raises(ImageError, match="refused before decoding") as err:
        decode_image(png_header_only(10_000, 10_000))
    assert err.value.code == "decompression_bomb"


def test_limits_are_configurable():
    data = encode(random_rgb(100, 100), "PNG")
    with pytest.raises(ImageError) as err:
        decode_image(data, ImageLimits(max_pixels=9_999))
    assert err.value.code == "decompression_bomb"
    with pytest.raises(ImageError) as err:
        decode_image(data, ImageLimits(max_bytes=len(data) - 1))
    assert err.value.code == "too_large" and f"{len(data) - 1:,}" in str(err.value)
    assert decode_image(data, ImageLimits(max_pixels=10_000, max_bytes=len(data))).size == (100, 100)


def test_image_id_is_stable_and_distinct():
    assert image_id("/a/b.jpg") == image_id("/a/b.jpg")
    assert image_id("/a/b.jpg") != image_id("/a/c.jpg")
    assert len(image_id("s3://bucket/x.png")) == 32
