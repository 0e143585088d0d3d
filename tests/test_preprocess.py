"""server/preprocess.py on synthetic images: every Pillow mode, EXIF, alpha, polarity, crop, fit, centring."""

import io
import re
import struct
import subprocess
import sys
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import IcoImagePlugin, Image, ImageDraw, ImageFile, features

import preprocess  # noqa: E402
from helpers import mnist_path  # noqa: E402
from preprocess import ImageError, OverBudget, PixelBudget, UnsupportedImage  # noqa: E402


def encode(image, fmt="PNG", **kwargs):
    out = io.BytesIO()
    image.save(out, fmt, **kwargs)
    return out.getvalue()


def bar_digit(size=(200, 120), box=(60, 20, 80, 100), ink=0, paper=255, mode="L"):
    """A '1'-like vertical bar: `ink` on `paper`, tall and narrow, off-centre."""
    image = Image.new("L", size, paper)
    ImageDraw.Draw(image).rectangle(box, fill=ink)
    return image.convert(mode) if mode != "L" else image


def centre_of_mass(a):
    rows, cols = np.indices(a.shape)
    return (rows * a).sum() / a.sum(), (cols * a).sum() / a.sum()


def ink_box(a, level=0.0):
    rows, cols = np.flatnonzero(a.max(axis=1) > level), np.flatnonzero(a.max(axis=0) > level)
    return rows[0], rows[-1], cols[0], cols[-1]


def check_bar(out):
    """The bar comes out MNIST-style: bright on black, 20 px tall, narrow, centred by mass."""
    assert out.shape == (28, 28) and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() == pytest.approx(1.0, abs=1e-3)
    top, bottom, left, right = ink_box(out)
    assert bottom - top + 1 == 20, (top, bottom)
    assert right - left + 1 <= 8  # aspect kept: 21x81 box -> about 5x20
    cy, cx = centre_of_mass(out)
    assert abs(cy - 14) <= 0.5 + 1e-6 and abs(cx - 14) <= 0.5 + 1e-6  # MNIST's centre of mass, to the pixel
    assert out[0].max() == 0 and out[:, 0].max() == 0  # background black
    return out


def test_dark_ink_on_light_paper_is_inverted_cropped_fitted_and_centred():
    check_bar(preprocess.preprocess(encode(bar_digit())))


def test_mnist_style_input_is_left_as_it_is():
    check_bar(preprocess.preprocess(encode(bar_digit(size=(28, 28), box=(13, 4, 14, 23), ink=255, paper=0))))


def test_real_mnist_digits_come_out_as_they_went_in():
    """MNIST digits are already in a 20x20 box centred by mass at (14, 14): the preprocessing leaves
    them as they are (at most the faintest edge pixels, below SMALL_THRESHOLD, are dropped). Centring
    at 13.5, or cutting at 0.2, would move or thin most of them."""
    with np.load(mnist_path(), allow_pickle=False) as npz:
        digits = npz["x_test"][:300]
    changed = 0
    for digit in digits:
        out = preprocess.preprocess(encode(Image.fromarray(digit)))
        expected = digit / 255.0 * (digit >= preprocess.SMALL_THRESHOLD * 255)
        changed += np.abs(out - expected).max() > 0.01
    assert changed <= 3, f"{changed} of {len(digits)} MNIST digits changed"


@pytest.mark.parametrize("mode", ["L", "RGB", "P", "CMYK", "I", "I;16", "1", "LA", "RGBA", "F"])
def test_every_pillow_mode(mode):
    """Every mode an upload decodes to, through preprocess(); I and F (32-bit integer and float: only TIFF and
    other formats outside preprocess.FORMATS hold them, and those are refused) through the same steps after
    decoding (grey_image, work_image, digit_in_frame), and their TIFF refused."""
    image = bar_digit(mode="RGB")
    if mode == "I;16":
        array = np.where(np.asarray(image.convert("L")) > 128, 60000, 1000).astype(np.uint16)
        image = Image.fromarray(array)
        assert image.mode == "I;16"
    elif mode in ("I", "F"):
        image = image.convert("L").convert(mode)
    else:
        image = image.convert(mode)
    if mode in ("I", "F"):
        check_bar(preprocess.digit_in_frame(*preprocess.work_image(preprocess.grey_image(image))))
        with pytest.raises(UnsupportedImage):
            preprocess.preprocess(encode(image, "TIFF"))
        return
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    check_bar(preprocess.preprocess(encode(image, fmt)))


def test_16_bit_png_with_low_contrast():
    array = np.where(np.asarray(bar_digit()) > 128, 30000, 29000).astype(np.uint16)
    check_bar(preprocess.preprocess(encode(Image.fromarray(array))))


def test_transparent_canvas_export_black_strokes_on_alpha():
    rgba = np.zeros((280, 280, 4), np.uint8)  # fully transparent black ...
    rgba[40:240, 130:150, 3] = 255  # ... with an opaque black bar
    out = check_bar(preprocess.preprocess(encode(Image.fromarray(rgba, "RGBA"))))
    assert out.sum() > 20


def test_palette_with_transparency():
    image = Image.new("P", (100, 100), 0)
    image.putpalette([0, 0, 0, 0, 0, 0] + [0] * 762)  # both entries black; index 0 transparent
    ImageDraw.Draw(image).rectangle((45, 10, 55, 90), fill=1)
    out = preprocess.preprocess(encode(image, transparency=0))
    top, bottom, _, _ = ink_box(out)
    assert bottom - top + 1 == 20


def test_exif_rotation_is_applied():
    horizontal = bar_digit(size=(120, 200), box=(20, 60, 100, 80))  # a lying bar ...
    exif = Image.Exif()
    exif[0x0112] = 6  # ... stored rotated: viewers turn it 90 degrees clockwise, making it stand
    data = encode(horizontal.convert("RGB"), "JPEG", exif=exif, quality=95)
    check_bar(preprocess.preprocess(data))


def test_noisy_jpeg_photo_off_centre():
    rng = np.random.default_rng(0)
    image = np.asarray(bar_digit(size=(400, 300), box=(300, 40, 330, 200), ink=40, paper=220), np.float32)
    image = image + rng.normal(0, 8, image.shape) + np.linspace(-20, 20, 400)[None, :]
    data = encode(Image.fromarray(np.uint8(np.clip(image, 0, 255))).convert("RGB"), "JPEG", quality=70)
    check_bar(preprocess.preprocess(data))


def test_wide_digit_is_fitted_by_width():
    out = preprocess.preprocess(encode(bar_digit(size=(300, 200), box=(30, 90, 230, 110))))
    top, bottom, left, right = ink_box(out)
    assert right - left + 1 == 20 and bottom - top + 1 <= 4


def test_blank_image_gives_an_empty_frame():
    assert preprocess.preprocess(encode(Image.new("L", (50, 50), 255))).max() == 0
    assert preprocess.preprocess(encode(Image.new("RGBA", (50, 50), (0, 0, 0, 0)))).max() == 0


def test_large_photo_is_reduced_before_the_pixel_work():
    big = bar_digit(size=(3000, 2000), box=(1400, 300, 1500, 1700)).convert("RGB")
    check_bar(preprocess.preprocess(encode(big, "JPEG", quality=90)))


@pytest.mark.parametrize("data,message", [
    (b"", "empty"),
    (b"GIF89a this is not really a gif", "not an image|corrupt"),
    (b"plain text, not an image", "not an image"),
])
def test_unusable_bytes_raise_image_error(data, message):
    with pytest.raises(ImageError, match=message):
        preprocess.preprocess(data)


def test_pixel_limit():
    """Over MAX_PIXELS: refused before decoding, the size in the reason, whether Pillow's own check (the same
    limit: its warning between 1 and 2 times it, its error above) or ours finds it first."""
    for side in (12000, 6400):  # 144 MP: Pillow's DecompressionBombError; 41 MP: its warning, made an error
        with pytest.raises(ImageError) as caught:
            preprocess.preprocess(encode(Image.new("1", (side, side))))
        assert str(caught.value) == f"image too large: {side}x{side} pixels (limit 40 megapixels)"
        assert caught.value.status == 400
    side = int(preprocess.MAX_PIXELS ** 0.5) - 1
    assert preprocess.decode(encode(Image.new("1", (side, side)))).size == (side, side)


def test_truncated_image():
    data = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)))
    with pytest.raises(ImageError, match="corrupt"):
        preprocess.preprocess(data[: len(data) // 2])


def test_white_strokes_on_transparency_are_composited_onto_black():
    rgba = np.zeros((280, 280, 4), np.uint8)
    rgba[40:240, 130:150] = (255, 255, 255, 255)  # an opaque white bar on a fully transparent ground
    check_bar(preprocess.preprocess(encode(Image.fromarray(rgba, "RGBA"))))


def test_exif_orientation_of_a_png_is_applied():
    """A PNG's eXIf chunk is honoured too (the fast path skips EXIF parsing only when there is none)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    lying = bar_digit(size=(120, 200), box=(20, 60, 100, 80))
    check_bar(preprocess.preprocess(encode(lying, "PNG", exif=exif)))
    assert ink_box(preprocess.preprocess(encode(lying, "PNG")))[1] - ink_box(preprocess.preprocess(encode(lying, "PNG")))[0] < 8


def test_low_contrast_pencil_under_uneven_light():
    """Grey pencil only 30 levels darker than the paper, while the light falls off by 40 levels across the
    sheet: the darker side of the paper is not ink (a border-median background made it so)."""
    rng = np.random.default_rng(3)
    light = np.linspace(230, 190, 300, dtype=np.float32)[None, :] * np.ones((260, 1), np.float32)
    bar = np.zeros((260, 300), np.float32)
    bar[40:200, 140:146] = 30
    image = light - bar + rng.normal(0, 3, bar.shape)
    data = encode(Image.fromarray(np.uint8(np.clip(image, 0, 255))).convert("RGB"), "JPEG", quality=85)
    out = preprocess.preprocess(data)
    top, bottom, left, right = ink_box(out)
    assert bottom - top + 1 == 20 and right - left + 1 <= 4, (top, bottom, left, right)


def test_speck_far_from_the_digit_does_not_shrink_it():
    image = bar_digit(size=(300, 300), box=(140, 60, 150, 240))
    ImageDraw.Draw(image).rectangle((5, 5, 7, 7), fill=0)  # a fleck of dirt in the corner
    check_bar(preprocess.preprocess(encode(image.convert("RGB"), "JPEG", quality=90)))


def five_with_a_detached_bar(speck=None):
    """300x300 grey paper, dark ink: a stem 121 px tall and, 41 px above it (more than 8% of the side, less than
    JOIN times the stem), a bar as a 5's drawn apart; `speck`: also a fleck (x0, y0, x1, y1)."""
    image = Image.new("L", (300, 300), 235)
    draw = ImageDraw.Draw(image)
    draw.rectangle((120, 120, 131, 240), fill=60)  # the stem
    draw.rectangle((120, 70, 200, 78), fill=60)  # the bar
    if speck:
        draw.rectangle(speck, fill=60)
    return encode(image.convert("RGB"), "JPEG", quality=90)


def test_a_part_of_the_digit_drawn_apart_is_kept():
    out = preprocess.preprocess(five_with_a_detached_bar())
    top, bottom, left, right = ink_box(out, 0.2)
    assert bottom - top + 1 == 20  # bar and stem: 171 px high scaled to 20
    rows = out.max(axis=1) > 0.2
    assert rows[top] and rows[bottom] and not rows[top:bottom + 1].all()  # the gap between them is in the frame
    assert right - left + 1 >= 8  # the bar's width (81 px) is in it too


def test_a_speck_near_the_digit_is_still_left_out():
    # 3x3 px, 30 px below the stem (within JOIN's reach) but far less than PART of the stem's ink
    out = preprocess.preprocess(five_with_a_detached_bar(speck=(125, 270, 127, 272)))
    top, bottom, _, _ = ink_box(out, 0.2)
    assert bottom - top + 1 == 20
    assert np.array_equal(out > 0.2, preprocess.preprocess(five_with_a_detached_bar()) > 0.2)


# ------------------------------------------------------------------------------- drawings and views

def ring(size=280, box=(3, 42, 277, 270), width=22, mode="RGBA"):
    """A big '0' drawn as the page's pad draws: black strokes `width` wide on a transparent (RGBA) or white
    (L) ground, touching the canvas' edges."""
    image = Image.new("RGBA", (size, size), (0, 0, 0, 0)) if mode == "RGBA" else Image.new("L", (size, size), 255)
    ImageDraw.Draw(image).ellipse(box, outline=(0, 0, 0, 255) if mode == "RGBA" else 0, width=width)
    return image


@pytest.mark.parametrize("mode", ["RGBA", "L"])
def test_a_big_drawing_touching_the_edges_is_a_ring_not_a_blank(mode):
    """A flat ground is a drawing, not a photo: the photo path took the ring on the border for paper and
    returned an empty frame."""
    out = preprocess.preprocess(encode(ring(mode=mode)))
    assert out.max() == pytest.approx(1.0, abs=1e-3)
    top, bottom, left, right = ink_box(out, 0.5)
    assert max(bottom - top, right - left) + 1 >= 19  # fills the 20x20 box
    assert out[13:16, 13:16].max() == 0  # and keeps its hole
    assert preprocess.flat_background(np.asarray(ring(mode="L"), np.float32))


def test_a_photo_has_no_flat_border():
    rng = np.random.default_rng(1)
    paper = np.clip(rng.normal(200, 4, (120, 160)), 0, 255)
    assert not preprocess.flat_background(paper.astype(np.float32))


def test_thick_strokes_get_a_second_view_thinned_to_mnist_width():
    """A ring drawn 25 px wide, 91 px across, is 5.5 px wide in the 20x20 box (MNIST's strokes: 1.6-4.6): two
    views, the drawing and the same thinned to about THICK, both centred by mass."""
    data = encode(ring(size=100, box=(4, 4, 94, 94), width=25, mode="L"))
    views = preprocess.preprocess_views(data)
    assert views.shape == (2, 28, 28) and views.dtype == np.float32
    assert np.array_equal(views[0], preprocess.preprocess(data))
    assert preprocess.stroke_width(views[0]) > 5
    assert abs(preprocess.stroke_width(views[1]) - preprocess.THICK) < 0.8, preprocess.stroke_width(views[1])
    for view in views:
        cy, cx = centre_of_mass(view)
        assert abs(cy - 14) <= 0.5 + 1e-5 and abs(cx - 14) <= 0.5 + 1e-5
        assert view.max() == pytest.approx(1.0, abs=1e-3)


def test_mnist_digits_and_thin_strokes_get_one_view():
    with np.load(mnist_path()) as npz:
        digits = npz["x_test"][:50]
    for digit in digits:  # an MNIST digit already fits the box: never thinned
        assert preprocess.preprocess_views(encode(Image.fromarray(digit))).shape == (1, 28, 28)
    thin = bar_digit(size=(200, 200), box=(90, 20, 95, 180))  # 6 px of 161: 0.75 px in the box
    assert preprocess.preprocess_views(encode(thin)).shape == (1, 28, 28)
    blank = encode(Image.new("L", (80, 80), 255))
    assert preprocess.preprocess_views(blank).shape == (1, 28, 28)


def test_views_are_stacked_for_the_model_and_averaged_per_upload():
    one, two = np.zeros((1, 28, 28), np.float32), np.ones((2, 28, 28), np.float32)
    images, starts = preprocess.stack_views([one, one])
    assert images.shape == (2, 28, 28) and starts is None  # the common case: nothing to average
    images, starts = preprocess.stack_views([one, two, one])
    assert images.shape == (4, 28, 28) and list(starts) == [0, 1, 3]
    probabilities = np.arange(40, dtype=np.float64).reshape(4, 10)
    mean = preprocess.mean_over_views(probabilities, starts)
    assert mean.shape == (3, 10)
    assert np.array_equal(mean[0], probabilities[0]) and np.array_equal(mean[2], probabilities[3])
    assert np.allclose(mean[1], (probabilities[1] + probabilities[2]) / 2)
    assert preprocess.mean_over_views(probabilities, None) is probabilities


def test_a_solid_blob_loses_at_most_max_thin_of_its_width():
    """A filled disk has no strokes: its 'width' is its diameter. The thinned view takes MAX_THIN px off each
    side and keeps the rest (so the erosion's cost stays bounded however wide the ink)."""
    image = Image.new("L", (300, 300), 255)
    ImageDraw.Draw(image).ellipse((20, 20, 280, 280), fill=0)
    views = preprocess.preprocess_views(encode(image))
    assert views.shape == (2, 28, 28)
    widths = [int((view[14] > 0.5).sum()) for view in views]
    assert widths[0] >= 19 and abs(widths[0] - 2 * preprocess.MAX_THIN - widths[1]) <= 1, widths


# ------------------------------------------------------------------- hostile inputs (issue 28, item 1)

def lying_ico(size=(300, 200)):
    """An ICO whose directory says 16x16 but whose one entry is a `size` PNG (Pillow's ICO plugin decodes
    that PNG inside Image.open, before any pixel check could see its size)."""
    inner = encode(Image.new("RGBA", size, (0, 0, 0, 255)))
    return struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(inner), 22) + inner


def growing_gif(width, height):
    """A GIF whose logical screen is 10x10 but whose first frame is width x height (no pixel data: truncated)."""
    head = b"GIF89a" + struct.pack("<HH", 10, 10) + bytes([0x80, 0, 0]) + b"\x00\x00\x00\xff\xff\xff"
    frame = b"," + struct.pack("<HHHH", 0, 0, width, height) + b"\x00" + b"\x02\x02\x4c\x01\x00"
    return head + frame + b";"


@pytest.fixture
def refused_plugins_never_run(monkeypatch):
    """Every Pillow plugin outside preprocess.FORMATS replaced by one that records being called: the test
    asserts none was (only their magic-number checks may run, to name the format)."""
    Image.init()
    called = []

    def spy(name):
        def factory(fp, filename=None):
            called.append(name)
            raise SyntaxError("spy")
        return factory

    for name, (_, accept) in list(Image.OPEN.items()):
        if name not in preprocess.FORMATS:
            monkeypatch.setitem(Image.OPEN, name, (spy(name), accept))
    yield called
    assert called == [], f"plugins outside the allow-list were run: {called}"


def test_the_allow_list_and_pillows_own_limit():
    assert preprocess.FORMATS == ("PNG", "JPEG", "GIF", "BMP", "WEBP")
    assert Image.MAX_IMAGE_PIXELS == preprocess.MAX_PIXELS  # Pillow's bomb check agrees with ours
    assert ImageError.status == 400 and UnsupportedImage.status == 415 and OverBudget.status == 413
    assert issubclass(UnsupportedImage, ImageError) and issubclass(OverBudget, ImageError)


def crafted(name):
    """Bytes in a format Pillow reads but the server refuses, by Pillow's name for it."""
    bar = bar_digit(size=(40, 30), box=(15, 5, 20, 25))
    if name == "PSD":
        return b"8BPS\x00\x01" + bytes(6) + struct.pack(">HIIHH", 1, 30, 40, 8, 1) + bytes(64)
    if name == "FITS":
        return b"".join(card.ljust(80).encode() for card in ["SIMPLE  = T", "BITPIX  = 8", "NAXIS   = 0", "END"])
    if name == "ICO":
        return lying_ico()
    if name == "JPEG2000":
        return encode(bar.convert("RGB"), "JPEG2000")
    return encode(bar.convert("RGB"), name)


@pytest.mark.parametrize("name", ["TIFF", "ICO", "PSD", "JPEG2000", "AVIF", "PPM", "PCX", "SGI", "FITS", "QOI"])
def test_formats_outside_the_allow_list_are_refused_with_415(name, refused_plugins_never_run):
    if name == "AVIF" and not features.check("avif") or name == "JPEG2000" and not features.check("jpg_2000"):
        pytest.skip(f"this Pillow cannot write {name}")
    with pytest.raises(UnsupportedImage) as caught:
        preprocess.preprocess_views(crafted(name))
    assert caught.value.status == 415
    assert str(caught.value) == f"unsupported image format: {name} (send PNG, JPEG, GIF, BMP or WebP)"


def test_formats_without_a_magic_number_are_not_an_image(refused_plugins_never_run):
    """TGA (and Pillow's IM, SPIDER ...) have no magic number to name them by: 'not an image', 400."""
    with pytest.raises(ImageError, match=r"^not an image \(send PNG, JPEG, GIF, BMP or WebP\)$") as caught:
        preprocess.preprocess_views(encode(bar_digit(size=(40, 30)), "TGA"))
    assert type(caught.value) is ImageError and caught.value.status == 400


def test_the_lying_ico_is_refused_before_its_png_is_decoded(refused_plugins_never_run, monkeypatch):
    """Pillow's ICO plugin alone decodes the ICO's 300x200 PNG inside Image.open (its size is the PNG's, not
    the 16x16 the header says); the allow-list never lets it (nor any decoder) run at all."""
    data = lying_ico()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow: "Image was not the expected size"
        assert IcoImagePlugin.IcoImageFile(io.BytesIO(data)).size == (300, 200)
    loads = []
    load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self) or load(self))
    with pytest.raises(UnsupportedImage, match="ICO"):
        preprocess.preprocess_views(data)
    assert loads == []
    preprocess.preprocess_views(encode(bar_digit()))
    assert loads  # (the spy sees a decode)


def test_a_nan_tiff_is_refused_by_the_allow_list_and_float_levels_must_be_finite():
    """A float TIFF holding NaN was a 500; TIFF is refused now (415). No allowed format holds floats (PNG, JPEG,
    GIF, BMP and WebP are integers), so NaN can only reach the float path through to_mnist: a clean 400."""
    nan = np.full((30, 40), np.nan, np.float32)
    nan[5:25, 18:22] = 1.0
    with pytest.raises(UnsupportedImage):
        preprocess.preprocess_views(encode(Image.fromarray(nan, "F"), "TIFF"))
    for bad in (np.nan, np.inf, -np.inf):
        grey = np.zeros((30, 40), np.float32)
        grey[5:25, 18:22] = 1.0
        grey[0, 0] = bad
        with pytest.raises(ImageError, match="not numbers") as caught:
            preprocess.to_mnist(grey)
        assert caught.value.status == 400


def test_only_the_first_frame_of_an_animation_is_decoded_and_charged():
    """18 frames of 1500x1500 (40.5 MP together, over MAX_PIXELS): the first is the upload (it is the digit),
    read and charged alone; a budget short of one frame refuses the next such file."""
    frames = [bar_digit(size=(1500, 1500), box=(700 + i, 200, 800 + i, 1300)) for i in range(18)]
    out = io.BytesIO()
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:], duration=100)
    data = out.getvalue()
    assert Image.open(io.BytesIO(data)).n_frames == 18
    budget = PixelBudget(4_000_000)
    check_bar(preprocess.preprocess_views(data, budget)[0])
    assert budget.left == 4_000_000 - 1500 * 1500
    with pytest.raises(OverBudget):
        preprocess.preprocess_views(data, budget)


def test_a_gif_frame_larger_than_its_screen_is_counted_at_its_real_size():
    """The pixel rule is on what will be decoded: a first frame that grows the 10x10 screen is counted at its
    size (over MAX_PIXELS: refused by Pillow's check, turned into ours)."""
    with pytest.raises(ImageError) as caught:
        preprocess.preprocess_views(growing_gif(7000, 7000))
    assert type(caught.value) is ImageError
    assert str(caught.value) == "image too large: 7000x7000 pixels (limit 40 megapixels)"
    budget = PixelBudget(1_000_000)
    with pytest.raises(OverBudget):
        preprocess.preprocess_views(growing_gif(2000, 2000), budget)
    assert budget.left == 1_000_000
    with pytest.raises(ImageError, match="corrupt"):  # within the limits: read, and its missing data found
        preprocess.preprocess_views(growing_gif(300, 300))


CHILD_PEAK = """
import sys
from pathlib import Path
import preprocess
def peak():
    return int(next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:")).split()[1])
data = Path(sys.argv[1]).read_bytes()
before = peak()
preprocess.preprocess_views(data)
print(peak() - before)
"""


def test_a_40_megapixel_png_is_read_within_a_memory_bound(tmp_path):
    """6320x6320 RGBA (the page's canvas style): box-reduced in 8 bits, in strips, before any float array.
    NumPy's peak stays under 60 MB (it was 650 MB: a float composite at full size); the whole process' peak
    grows by less than 230 MB (it grew 950 MB), most of it Pillow's decoded RGBA image (160 MB)."""
    side = 6320
    image = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    ImageDraw.Draw(image).rectangle((3000, 600, 3300, 5600), fill=(0, 0, 0, 255))
    data = encode(image, compress_level=1)
    del image
    tracemalloc.start()
    try:
        views = preprocess.preprocess_views(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 60 * 2**20, f"{peak / 2**20:.0f} MB"
    check_bar(views[0])
    if not Path("/proc/self/status").exists():
        return
    (tmp_path / "40mp.png").write_bytes(data)  # a fresh process: its peak is the decoding's, not this one's
    child = subprocess.run([sys.executable, "-c", CHILD_PEAK, str(tmp_path / "40mp.png")], capture_output=True,
                           text=True, cwd=Path(preprocess.__file__).parent, check=True)
    grown_mb = int(child.stdout.split()[-1]) / 1024
    assert grown_mb < 230, f"{grown_mb:.0f} MB"


def test_a_budget_is_shared_by_the_parts_of_a_request():
    data = encode(bar_digit(size=(2000, 1500), box=(900, 200, 1000, 1300)))  # 3 MP
    budget = PixelBudget(7_000_000)
    for _ in range(2):
        check_bar(preprocess.preprocess_views(data, budget)[0])
    assert budget.left == 1_000_000
    with pytest.raises(OverBudget) as caught:
        preprocess.preprocess_views(data, budget)
    assert caught.value.status == 413 and "\n" not in str(caught.value)
    assert str(caught.value) == "images too large together: over 7 megapixels to decode in one request"
    assert budget.left == 1_000_000  # the refused image drew nothing
    for _ in range(3):  # no budget: each image is held to MAX_PIXELS alone (the call the server made so far)
        check_bar(preprocess.preprocess_views(data)[0])
    assert PixelBudget().total == preprocess.REQUEST_PIXELS == preprocess.MAX_PIXELS


def test_a_jpeg_is_charged_what_it_decodes():
    """A baseline JPEG decodes at the draft's scale (3000x2000 at 1/4: 750x500); a progressive one keeps every
    coefficient of the full size in libjpeg whatever the scale, so it is charged all its pixels."""
    big = bar_digit(size=(3000, 2000), box=(1400, 300, 1500, 1700)).convert("RGB")
    for progressive, charged in ((False, 750 * 500), (True, 3000 * 2000)):
        budget = PixelBudget()
        check_bar(preprocess.preprocess_views(encode(big, "JPEG", quality=90, progressive=progressive), budget)[0])
        assert budget.total - budget.left == charged


def big_drawing(kind):
    image = Image.new("L", (2600, 2200), 255)
    draw = ImageDraw.Draw(image)
    draw.ellipse((900, 300, 1700, 1900), outline=0, width=150)
    draw.line((1000, 1800, 1600, 400), fill=0, width=120)
    if kind == "L":
        return encode(image)
    if kind == "RGBA":  # black strokes on transparency, as the page's canvas
        rgba = Image.new("RGBA", image.size, (0, 0, 0, 0))
        rgba.putalpha(Image.eval(image, lambda v: 255 - v))
        return encode(rgba)
    if kind == "GIF":  # palette with a transparent index
        palette = Image.eval(image, lambda v: 1 if v < 128 else 0).convert("P")
        palette.putpalette([255, 255, 255, 0, 0, 0] + [0] * 762)
        return encode(palette, "GIF", transparency=0)
    if kind == "I;16":
        return encode(Image.fromarray((np.asarray(image, np.uint16) * 200 + 1000).astype(np.uint16)))
    if kind == "JPEG-wide":  # 9000x700: wider than 8 times the draft's target, so the draft leaves 1125 px
        wide = Image.new("L", (9000, 700), 230)
        ImageDraw.Draw(wide).rectangle((4400, 100, 4600, 600), fill=20)
        return encode(wide.convert("RGB"), "JPEG", quality=90)
    if kind == "RGB":
        return encode(image.convert("RGB"), "BMP")
    return encode(image.convert(kind), "WEBP", lossless=True)  # "P": a palette image, as WebP stores it


def nearest_match(view, other):
    """(mean |difference|, correlation) of view with other moved by at most a pixel each way, at the best move:
    the centring rounds the centre of mass to a pixel, and a reduction may move it across a half."""
    moved = [np.roll(other, (dy, dx), axis=(0, 1)) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    best = min(moved, key=lambda m: np.abs(view - m).mean())
    return float(np.abs(view - best).mean()), float(np.corrcoef(view.ravel(), best.ravel())[0, 1])


@pytest.mark.parametrize("kind", ["L", "RGBA", "GIF", "I;16", "RGB", "P", "JPEG-wide"])
def test_big_images_shrunk_in_8_bits_read_as_before(kind):
    """An image over SHRINK_SIDE is box-reduced as grey levels before anything is a float: the views are the
    full-size path's (decode without shrink, then the same steps) up to rounding (and, for the JPEG drafted
    to 1125x88, a pixel's move of the centring)."""
    data = big_drawing(kind)
    shrunk = preprocess.preprocess_views(data)
    full = preprocess.digit_views(*preprocess.work_image(preprocess.grey_image(preprocess.decode(data))))
    assert shrunk.shape == full.shape
    for view, other in zip(shrunk, full):
        difference, correlation = nearest_match(view, other)
        assert difference < 0.03 and correlation > 0.97, (difference, correlation)
        if kind != "JPEG-wide":
            assert np.abs(view - other).max() < 0.06


def test_images_up_to_the_shrink_side_are_untouched():
    """Every ordinary upload (the page's 280x280 canvas, MNIST's 28x28, a photo drafted to under 1024 px) is
    not reduced: the same views, to the bit, as decoding at full size."""
    for data in (encode(ring()), encode(bar_digit()), encode(bar_digit(size=(1024, 700), box=(500, 50, 540, 650))),
                 encode(bar_digit(size=(3000, 2000), box=(1400, 300, 1500, 1700)).convert("RGB"), "JPEG")):
        full = preprocess.digit_views(*preprocess.work_image(preprocess.grey_image(preprocess.decode(data))))
        assert np.array_equal(preprocess.preprocess_views(data), full)


def test_exif_orientation_of_a_shrunk_image_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6
    lying = bar_digit(size=(2400, 4000), box=(400, 1200, 2000, 1600))  # a lying bar, stored rotated
    check_bar(preprocess.preprocess(encode(lying, "PNG", exif=exif)))


def mutations(data, seed, count):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        blob = bytearray(data)
        for _ in range(int(rng.integers(1, 9))):
            blob[int(rng.integers(0, len(blob)))] = int(rng.integers(0, 256))
        if rng.random() < 0.3:
            blob = blob[:int(rng.integers(1, len(blob)))]
        yield bytes(blob)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "WEBP"])
def test_damaged_images_give_a_clean_one_line_error_never_anything_else(fmt):
    """Random bytes overwritten and files cut short, 150 of each allowed format: the upload either reads
    (finite views in [0, 1]) or raises ImageError with a 4xx status and one line, with no absolute path."""
    data = encode(bar_digit(size=(48, 40), box=(20, 5, 26, 34)).convert("RGB"), fmt)
    read = refused = 0
    for blob in mutations(data, seed=len(fmt), count=150):
        try:
            views = preprocess.preprocess_views(blob)
        except ImageError as err:
            message = str(err)
            assert err.status in (400, 413, 415) and message and "\n" not in message and len(message) <= 220, message
            assert not re.search(r"(^|[\s(])/[\w.-]+/", message), message
            refused += 1
        else:
            assert np.isfinite(views).all() and views.min() >= 0 and views.max() <= 1
            read += 1
    assert read + refused == 150
