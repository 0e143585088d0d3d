"""Turn any uploaded image into a 28x28 MNIST-style input, the way MNIST itself was made.

Steps: decode (PNG, JPEG, GIF, BMP or WebP only; its first frame; EXIF orientation applied; the pixels it will
decode counted against MAX_PIXELS and the request's PixelBudget before decoding; a big image box-reduced in
8 bits to at most SHRINK_SIDE on a side before anything is a float) -> grey levels (alpha composited onto white,
or onto black under light strokes), at most WORK_SIDE px on a side -> bright ink on dark ground
(inverted when the border says the background is light) -> background removed (a photo's: a surface
fitted to its paper, so uneven light is not ink) and levels within the noise dropped -> cropped to the
ink -> very thin strokes thickened -> scaled to fit 20x20 keeping the aspect ratio -> placed in 28x28
with its centre of mass at (14, 14), where MNIST's is. An MNIST digit comes out as it went in. Strokes
much thicker than MNIST's also give a second view, thinned; the server averages the model's answers.

benchmarks/benchmark-uploads.py measures the accuracy and the time per upload style (photo, the
page's canvas, thick strokes on a small canvas, pencil); benchmarks/benchmark-decode.py what decoding
costs (time, memory) for small and hostile images.
Only Pillow and NumPy; no TensorFlow, so it is cheap to import and to test.
"""

import contextlib
import io
import re
import warnings

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image, ImageFilter, UnidentifiedImageError

MAX_PIXELS = 40_000_000  # an image over this (width x height of what would be decoded) is refused before decoding
REQUEST_PIXELS = MAX_PIXELS  # what one request's images may decode together (PixelBudget's default): one
# image at the limit, or 32 of 1.25 MP; a 2 MB body holds eleven 40 MP PNGs of flat colour (180 kB each)
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP")  # Pillow's names of the formats read: what cameras, phones,
# browsers (a canvas' toBlob) and drawing programs send. Pillow's other plugins (TIFF, ICO, PSD, JPEG 2000,
# FITS, EPS, ...) are never tried: some decode inside Image.open (an ICO's embedded PNG, whatever its header
# says), some hold float pixels (TIFF, FITS: NaN), and each is more parser code facing the network.
# A camera's MPO (several JPEGs in one file) opens as JPEG: its first picture is read.
FORMAT_NAMES = "PNG, JPEG, GIF, BMP or WebP"
Image.MAX_IMAGE_PIXELS = MAX_PIXELS  # Pillow's own bomb check (its warning above this, its error above twice
# this, also on a GIF frame that grows the image) agrees with ours; decode() turns its warning into ImageError
WORK_SIDE = 512  # larger images are reduced to about this before the pixel work (speed only)
SHRINK_SIDE = 2 * WORK_SIDE  # a decoded image larger than this on a side is first box-reduced by an integer
# factor to at most this, in 8 bits and in strips of STRIP pixels: no float array is ever larger than
# SHRINK_SIDE^2 and no temporary larger than a strip (the old way composited a 40 MP RGBA PNG in floats at
# full size: 650 MB of NumPy arrays). Images up to SHRINK_SIDE, every ordinary upload, are unchanged by it.
STRIP = 1 << 20
BOX = 20  # MNIST: the digit is scaled to fit a 20x20 box ...
SIZE = 28  # ... inside a 28x28 image, centred by centre of mass
INK_THRESHOLD = 0.2  # in a photo, after normalisation, levels below this are background (paper texture)
SMALL_THRESHOLD = 0.05  # the same in a drawing or a small image (an MNIST digit), beside its noise
LARGE = 56  # px: an image at least this on both sides may be a photo (else a drawing or an MNIST digit)
CENTRE = 14.0  # MNIST's centre of mass is at (14, 14) (measured on the training set), not at 13.5
FIT_GRID = 32  # a photo's paper is fitted on about a 32x32 grid of it
JOIN, PART = 0.4, 0.05  # a large image's crop takes in a part of the digit drawn apart (a 5's bar) up to 0.4 times
# the digit's extent away, if it has 5% of the ink of the digit's largest part (a speck has far less)
THIN, THIN_TO = 1.2, 2.0  # strokes narrower than this in the 20x20 box (MNIST's: 1.6-4.6, median 2.5) are
FINE = 4  # ... thickened to THIN_TO, at FINE times the final scale
THICK = 3.5  # strokes wider than this in the box (MNIST's 90th percentile: 3.4) also get a view thinned to it:
# the model's answer is the mean of both views' probabilities (either view alone was less accurate)
MAX_THIN = 2  # at most this many pixels (in the box) come off each side of a stroke (widths up to 7.5 reach
# THICK); a solid blob is no stroke, and the erosion's cost stays bounded


# Where Pillow's getexif() finds an orientation (besides a TIFF's own tags): without them it is 1, upright.
ORIENTATION_KEYS = ("exif", "Raw profile type exif", "XML:com.adobe.xmp", "xmp")
# EXIF orientation -> the transpose that makes the image upright (as ImageOps.exif_transpose's table)
UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
           5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


_INDEX = np.arange(SIZE, dtype=np.float32)  # row/column numbers for the centre of mass


class ImageError(ValueError):
    """The upload is not a usable image; the message (one line) says why, shown to the client with `status`."""

    status = 400


class UnsupportedImage(ImageError):
    """An image in a format outside FORMATS (TIFF, ICO, PSD, ...): 415 Unsupported Media Type."""

    status = 415


class OverBudget(ImageError):
    """The request's images together would decode to more pixels than its PixelBudget: 413."""

    status = 413


class PixelBudget:
    """The pixels one request's images may decode together. Pass one to preprocess_views() for each of the
    request's files: each draws what it will decode (after JPEG's draft: every pixel of a progressive JPEG,
    whose decoder keeps them all) before decoding; OverBudget when the rest does not cover it."""

    def __init__(self, total=REQUEST_PIXELS):
        self.total = self.left = int(total)

    def draw(self, pixels):
        if pixels > self.left:
            raise OverBudget(f"images too large together: over {self.total / 1e6:g} megapixels to decode "
                             "in one request")
        self.left -= pixels


def _reason(err):
    """An exception's text as one line for a client: no absolute path, at most 160 characters."""
    text = " ".join(str(err).split())
    text = re.sub(r"(?:[A-Za-z]:)?(?:[\\/][\w.@+-]+){2,}", "<path>", text)
    return (text[:157] + "...") if len(text) > 160 else (text or type(err).__name__)


def _too_large(size=None):
    limit = f"(limit {MAX_PIXELS // 1_000_000} megapixels)"
    return f"image too large: {size[0]}x{size[1]} pixels {limit}" if size else f"image too large {limit}"


def _bomb_size(err):
    """The (width, height) Pillow's bomb check refused: the `size` its _decompression_bomb_check was called with
    (in Image.open, or a GIF's first frame growing the screen), found in the traceback; None if not there."""
    size, frame = None, err.__traceback__
    while frame is not None:
        if frame.tb_frame.f_code.co_name == "_decompression_bomb_check":
            size = frame.tb_frame.f_locals.get("size")
        frame = frame.tb_next
    ok = isinstance(size, tuple) and len(size) == 2 and all(isinstance(side, int) for side in size)
    return size if ok else None


@contextlib.contextmanager
def _clean_errors():
    """Any failure of Pillow (or NumPy) on the image's data -> ImageError with a one-line reason, never a 500.
    MemoryError is no fault of the image: it stays what it is."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # above MAX_PIXELS: ours, below
            warnings.simplefilter("ignore", UserWarning)  # e.g. "Corrupt EXIF data": the image still reads
            yield
    except (ImageError, MemoryError):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(_too_large(_bomb_size(err))) from None
    except Exception as err:  # OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, ...
        raise ImageError(f"truncated or corrupt image ({_reason(err)})") from None


def _unidentified(data):
    """The ImageError for bytes no allowed plugin opened: corrupt (they start as an allowed format does),
    UnsupportedImage naming the format Pillow would take them for (its plugins' magic-number checks only: no
    other plugin code runs), else not an image."""
    Image.init()
    prefix = data[:16]
    refused = None
    for name, (_, accept) in list(Image.OPEN.items()):
        try:
            matches = accept is not None and bool(accept(prefix))
        except Exception:
            matches = False
        if matches and name in FORMATS:
            return ImageError(f"truncated or corrupt image (not a readable {name} file)")
        if matches and refused is None:
            refused = name
    if refused:
        return UnsupportedImage(f"unsupported image format: {refused} (send {FORMAT_NAMES})")
    return ImageError(f"not an image (send {FORMAT_NAMES})")


def _open(data):
    """Bytes -> an opened (header read, nothing decoded) Pillow image of FORMATS."""
    try:
        return Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise _unidentified(data) from None


def decode(data, budget=None, shrink=False):
    """bytes -> a loaded, upright PIL image (the first frame). Raises ImageError for anything unusable
    (UnsupportedImage: 415, OverBudget: 413, else 400), before decoding when the pixel counts say so.
    budget: a PixelBudget the pixels decoded are drawn from. shrink: a side over SHRINK_SIDE box-reduced to it
    (_shrunk) before the image is made upright (what preprocess_views uses; without: the full size)."""
    if not data:
        raise ImageError("empty file")
    with _clean_errors():
        image = _open(data)
        width, height = image.size
        if width <= 0 or height <= 0:
            raise ImageError(f"image has zero size ({width}x{height})")
        if width * height > MAX_PIXELS:
            raise ImageError(_too_large((width, height)))
        if image.format in ("JPEG", "MPO") and max(width, height) > 2 * WORK_SIDE:
            # decode at 1/2, 1/4 or 1/8 scale (much faster), the longest side still >= 0.9 * WORK_SIDE
            side = 0.9 * WORK_SIDE / max(width, height)
            image.draft(image.mode, (max(1, int(width * side)), max(1, int(height * side))))
        decoded = width * height if image.info.get("progressive") else image.width * image.height
        if budget is not None:
            budget.draw(decoded)
        image.load()
        orientation = 1
        if hasattr(image, "tag_v2") or any(key in image.info for key in ORIENTATION_KEYS):
            orientation = image.getexif().get(0x0112, 1)  # (parsing EXIF costs more than the rest for 28x28)
        if shrink:
            image = _shrunk(image)
        if orientation in UPRIGHT:
            image = image.transpose(UPRIGHT[orientation])
    if image.width <= 0 or image.height <= 0:
        raise ImageError("image has zero size")
    return image


def _reducible(image):
    """The mode a strip of the image is converted to before Image.reduce: the grey levels grey_image would
    take (L; LA with alpha; I for 16-bit; F kept), so the reduction does a third or a quarter of the work."""
    if image.mode in ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        return "LA"
    if image.mode.startswith("I"):
        return "I"
    return "F" if image.mode == "F" else "L"


def _as_grey(strip, mode):
    if mode == "LA":  # Pillow's reduce averages LA premultiplied (as La): compositing later is exact
        return strip.convert("RGBA").convert("LA") if strip.mode not in ("LA", "RGBA") else strip.convert("LA")
    if mode == "L" and strip.mode not in ("L", "1"):
        return strip.convert("RGB").convert("L")  # as grey_image converts: CMYK, YCbCr, P, RGB ...
    return strip.convert(mode) if strip.mode != mode else strip


def _shrunk(image):
    """A loaded image with a side over SHRINK_SIDE -> box-reduced by the smallest integer factor that brings
    it to at most SHRINK_SIDE (Image.reduce: each output pixel the mean of a factor x factor box), as the grey
    levels grey_image takes (_reducible), one strip of about STRIP pixels at a time. Smaller images: as they are."""
    width, height = image.size
    factor = -(-max(width, height) // SHRINK_SIDE)
    if factor < 2:
        return image
    mode = _reducible(image)
    out = Image.new(mode, (-(-width // factor), -(-height // factor)))
    rows = factor * max(1, STRIP // (width * factor))  # a multiple of factor: the strips' boxes are the image's
    for top in range(0, height, rows):
        strip = _as_grey(image.crop((0, top, width, min(height, top + rows))), mode)
        out.paste(strip.reduce(factor), (0, top // factor))
    return out


def grey_image(image):
    """Any PIL image -> a PIL image of grey levels: mode L (8-bit) or F (16-bit and float modes, whose
    levels are kept), alpha composited onto white, or onto black when what is drawn on it is light."""
    has_alpha = image.mode in ALPHA_MODES or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        alpha = np.asarray(rgba.getchannel("A"), dtype=np.float32) * np.float32(1 / 255)
        level = np.asarray(rgba.convert("L"), dtype=np.float32)  # the colour's grey level, alpha aside
        drawn = float(alpha.sum())
        light = drawn > 0 and float((level * alpha).sum()) / drawn > 127.5
        grey = level * alpha if light else 255.0 - (255.0 - level) * alpha  # onto black / onto white
        return Image.fromarray(np.rint(grey).astype(np.uint8), mode="L")
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return Image.fromarray(np.asarray(image, dtype=np.float32), mode="F")
    if image.mode == "1":
        return image.convert("L")
    if image.mode != "L":
        return image.convert("RGB").convert("L")  # CMYK, YCbCr, LAB, HSV, P, RGB ...
    return image


def to_grey(image):
    """Any PIL image -> float32 2-D array of grey levels (arbitrary range), alpha composited onto white."""
    return np.asarray(grey_image(image), dtype=np.float32)


def _resize(grey, size):
    """Resize a float array with Pillow (mode F keeps the precision); size is (width, height)."""
    return np.asarray(Image.fromarray(grey, mode="F").resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0))


def _filter(grey, kind):
    return np.asarray(Image.fromarray(grey, mode="F").filter(kind))


def _median(values):
    """Median (upper middle element; np.median is several times slower on small arrays)."""
    middle = len(values) // 2
    return float(np.partition(values, middle)[middle])


def border_pixels(grey):
    """The outer ring of the image (about 5% of each side, at least one pixel)."""
    height, width = grey.shape
    band = max(1, min(height, width) // 20)
    return np.concatenate([grey[:band].ravel(), grey[-band:].ravel(), grey[:, :band].ravel(), grey[:, -band:].ravel()])


def paper_surface(grey):
    """The background of a photo as a smooth surface (uneven light, shading): a quadratic in x and y
    fitted to a coarse grid of the image. The first fit uses the grid's outer ring only (paper, not ink,
    however much of the middle the digit covers); then every cell within the paper's noise of it joins
    (robust: cells darker by more than 3 sigma are ink) and the fit is repeated.
    `grey` is in [0, 1] with the ink darker than the paper."""
    height, width = grey.shape
    step = max(1, max(height, width) // FIT_GRID)
    small = np.asarray(Image.fromarray(grey, mode="F").reduce(step)) if step > 1 else grey
    sh, sw = small.shape
    ys = (np.arange(sh, dtype=np.float32) + 0.5) / sh - 0.5
    xs = (np.arange(sw, dtype=np.float32) + 0.5) / sw - 0.5
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    terms = np.stack([np.ones_like(xx), xx, yy, xx * xx, xx * yy, yy * yy], axis=-1).reshape(-1, 6)
    terms = terms.astype(np.float64)
    values = small.ravel().astype(np.float64)
    ring = np.ones((sh, sw), bool)
    ring[2:-2, 2:-2] = False
    keep = ring.ravel()
    for _ in range(3):
        # least squares by the 6x6 normal equations (np.linalg.lstsq's SVD cost 2 ms a call here)
        chosen = terms[keep]
        normal = chosen.T @ chosen + 1e-9 * np.eye(6)
        coef = np.linalg.solve(normal, chosen.T @ values[keep])
        residual = values - terms @ coef
        sigma = max(1.4826 * _median(np.abs(residual[keep])), 2e-3)
        keep = (residual > -3 * sigma) & (residual < 4 * sigma)
    fy = (np.arange(height, dtype=np.float32) + 0.5) / height - 0.5
    fx = (np.arange(width, dtype=np.float32) + 0.5) / width - 0.5
    c = coef.astype(np.float32)
    return (c[0] + c[1] * fx + c[3] * fx * fx)[None, :] + (c[2] * fy + c[5] * fy * fy)[:, None] \
        + c[4] * np.outer(fy, fx)


def ink_extent(profile):
    """(first, last) index of the digit along one axis of a photo from its ink profile (ink per row or
    column): the run of rows with real ink (> 2% of the fullest row; gaps up to 8% of the side bridged)
    that holds the most ink, joined by the runs beside it that are part of the digit (a 5's or a 7's bar
    drawn apart from the rest: at most JOIN times the extent so far away, with at least PART of its ink),
    widened through the faint rows next to it. Specks, a shadow at the edge or a fold of the paper
    elsewhere are left out."""
    significant = profile > 0.02 * float(profile.max())
    index = np.flatnonzero(significant)
    gap = max(2, len(profile) * 8 // 100)
    breaks = np.flatnonzero(np.diff(index) > gap)
    starts = np.concatenate([[0], breaks + 1])
    ends = np.concatenate([breaks, [len(index) - 1]])
    cumulative = np.concatenate([[0.0], np.cumsum(profile)])
    masses = [cumulative[index[e] + 1] - cumulative[index[b]] for b, e in zip(starts, ends)]
    best = int(np.argmax(masses))
    low = high = best  # the runs joined so far
    while True:
        first, last = int(index[starts[low]]), int(index[ends[high]])
        reach, part = JOIN * (last - first + 1), PART * masses[best]
        if low > 0 and first - index[ends[low - 1]] - 1 <= reach and masses[low - 1] >= part:
            low -= 1
        elif high < len(masses) - 1 and index[starts[high + 1]] - last - 1 <= reach and masses[high + 1] >= part:
            high += 1
        else:
            break
    faint = profile > 0.002 * float(profile.max())
    while first > 0 and faint[first - 1]:
        first -= 1
    while last < len(profile) - 1 and faint[last + 1]:
        last += 1
    return first, last


def normalise(grey, photo=False):
    """Grey levels -> [0, 1] with the background at 0 and the ink at 1 (inverting a light background).
    Levels that do not stand out of the background's noise become 0. A photo's background is a fitted
    surface (uneven light, shading); a small image's is the median of its border."""
    low, high = float(grey.min()), float(grey.max())
    span = high - low
    if span < 1e-6:
        return np.zeros_like(grey, dtype=np.float32)
    border = border_pixels(grey)
    background = _median(border)
    light = background - low > 0.5 * span  # light paper, dark ink: make the ink bright as in MNIST
    if photo:
        grey = (high - grey if light else grey - low) * (1.0 / span)
        grey = grey + paper_surface(1.0 - grey) - 1.0  # ink above the paper, wherever the light was
        noise = 1.4826 * _median(np.abs(grey[::3, ::3].ravel()))
        floor = INK_THRESHOLD  # paper texture and shading the fit left
        ink = float(grey.max())
    else:  # a drawing or MNIST itself: its faint edge pixels are part of the digit
        noise = 1.4826 * _median(np.abs(border - background)) / span
        grey = background - grey if light else grey - background  # (scaled below: fewer passes)
        ink = ((background - low) if light else (high - background)) / span
        floor = SMALL_THRESHOLD
    if ink < max(6 * noise, 0.05 if photo else 0.1):  # nothing stands out from the background: blank
        return np.zeros_like(grey, dtype=np.float32)
    grey *= np.float32(1.0 / ink if photo else 1.0 / (ink * span))
    np.minimum(grey, 1.0, out=grey)
    grey *= grey >= max(floor, 4 * noise / ink)  # below: background (negative levels included)
    return grey.astype(np.float32, copy=False)


def stroke_width(ink):
    """Mean stroke width in pixels of a soft ink image: 2 * area / length of the outline (the outline's
    length from the total variation, corrected by 4/pi for strokes at every angle)."""
    area = float(ink.sum())
    variation = float(np.abs(np.diff(ink, axis=0)).sum() + np.abs(np.diff(ink, axis=1)).sum())
    return (8 / np.pi) * area / variation if variation else 0.0


def _box_size(ink):
    """Cropped ink (h, w) -> (scale, (width, height)) of it fitted to BOX x BOX keeping the aspect ratio."""
    height, width = ink.shape
    scale = BOX / max(height, width)
    return scale, (max(1, round(width * scale)), max(1, round(height * scale)))


def _restroked(ink, final, change):
    """Ink scaled to FINE times `final` (width, height), `change`d there (a grey dilation or erosion of its
    strokes), reduced to `final`."""
    fine = (final[0] * FINE, final[1] * FINE)
    ink = _resize(ink, fine) if fine != (ink.shape[1], ink.shape[0]) else ink
    return np.asarray(Image.fromarray(change(np.ascontiguousarray(ink, dtype=np.float32)), mode="F").reduce(FINE))


def _full_contrast(ink):
    """Negative levels cleared, the peak scaled to 1 (strokes thinned or shrunk a lot get faint)."""
    ink = np.clip(ink, 0.0, None)
    peak = float(ink.max())
    return ink / peak if peak > 0 else ink


def thinned(ink):
    """Cropped ink (h, w) scaled down to the box -> its strokes thinned to THICK wide (a grey erosion at FINE
    times the final scale), fitted to BOX x BOX; None when the strokes are not wider than THICK or the ink
    already fits (an MNIST digit is never thinned)."""
    scale, final = _box_size(ink)
    if final == (ink.shape[1], ink.shape[0]):
        return None
    stroke = stroke_width(np.pad(ink, 1)) * scale  # padded: ink at the crop's edges has an outline there too
    radius = min(int(round((stroke - THICK) / 2 * FINE)), MAX_THIN * FINE)
    if radius <= 0:
        return None
    digit = _full_contrast(_restroked(ink, final, lambda fine: _erode(fine, radius)))
    return digit if digit.max() > 0 else None


def _erode(grey, radius):
    """Grey erosion by a (2 radius + 1)-pixel square, edges repeated: Pillow's MinFilter, but separable (rows,
    then columns), so its cost grows with the radius, not with its square."""
    size = 2 * radius + 1
    padded = np.pad(grey, radius, mode="edge")
    rows = sliding_window_view(padded, size, axis=0).min(axis=-1)
    return np.ascontiguousarray(sliding_window_view(rows, size, axis=1).min(axis=-1))


def fit_box(ink):
    """Cropped ink (h, w) -> fitted to BOX x BOX keeping the aspect ratio. Strokes much thinner than
    MNIST's (pencil, a fine pen in a big photo) are thickened first, at FINE times the final scale."""
    scale, final = _box_size(ink)
    if final == (ink.shape[1], ink.shape[0]):
        return ink
    stroke = stroke_width(ink) * scale
    radius = int(round((THIN_TO - stroke) / 2 * FINE)) if stroke < THIN else 0
    if radius:
        ink = _restroked(ink, final, lambda fine: _filter(fine, ImageFilter.MaxFilter(2 * radius + 1)))
    else:
        ink = _resize(ink, final)
    return _full_contrast(ink)


def centre_in_frame(digit, row_mass=None, col_mass=None):
    """Place a (h<=20, w<=20) array in 28x28 with its centre of mass at MNIST's: (14, 14), to the pixel.
    row_mass/col_mass: the digit's sums per row/column when the caller has them already."""
    height, width = digit.shape
    if row_mass is None:
        row_mass, col_mass = digit.sum(axis=1), digit.sum(axis=0)
    total = float(row_mass.sum())
    cy = float(row_mass @ _INDEX[:height]) / total if total else (height - 1) / 2
    cx = float(col_mass @ _INDEX[:width]) / total if total else (width - 1) / 2
    top = min(max(int(round(CENTRE - cy)), 0), SIZE - height)
    left = min(max(int(round(CENTRE - cx)), 0), SIZE - width)
    frame = np.zeros((SIZE, SIZE), dtype=np.float32)
    frame[top:top + height, left:left + width] = digit
    return frame


def flat_background(grey):
    """Whether at least half of the image's border is one exact level: a drawing (the page's canvas, a
    drawing program), not a photo, whose paper always has noise."""
    border = border_pixels(grey)
    return np.count_nonzero(border == _median(border)) * 2 >= border.size


def work_image(image):
    """Grey PIL image (L or F) -> float32 array at most WORK_SIDE on a side, and whether it is a photo
    (both sides >= LARGE px and a border that is not one flat level): then a 3x3 box blur has evened out
    JPEG and sensor noise (as accurate as the 3x3 median used before on every style of
    benchmarks/benchmark-uploads.py, and a fifth of its CPU). A large drawing (the page's canvas) is no
    photo: its ground is its flat level, not a fitted paper surface (the fit took a big 0 touching the
    canvas' edges for paper and blanked it), and it needs no blur.
    An 8-bit image is reduced and filtered as 8 bits (several times faster than as floats)."""
    width, height = image.size
    if max(width, height) > WORK_SIDE:
        scale = WORK_SIDE / max(width, height)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    grey = np.asarray(image, dtype=np.float32)
    if image.mode == "F" and not np.isfinite(grey).all():
        raise ImageError("image has pixel values that are not numbers (NaN or infinity)")
    photo = min(image.size) >= LARGE and not flat_background(grey)
    if photo and image.mode == "L":
        grey = np.asarray(image.filter(ImageFilter.BoxBlur(1)), dtype=np.float32)
    if photo and image.mode != "L":  # 16-bit or float levels: the same 3x3 box, in NumPy (Pillow's is 8-bit)
        padded = np.pad(grey, 1, mode="edge")
        rows = padded[:-2] + padded[1:-1] + padded[2:]
        grey = (rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:]) * np.float32(1 / 9)
    return grey, photo


def to_mnist(grey):
    """Float grey array (any range, any polarity) -> float32 (28, 28) in [0, 1], ink bright."""
    grey = np.asarray(grey, dtype=np.float32)
    if grey.ndim != 2 or grey.size == 0:
        raise ImageError("image has zero size")
    return digit_in_frame(*work_image(Image.fromarray(grey, mode="F")))


def digit_in_frame(grey, photo):
    """work_image()'s array -> float32 (28, 28) in [0, 1], ink bright, MNIST's size and centring."""
    return digit_views(grey, photo)[0]


def digit_views(grey, photo):
    """work_image()'s array -> float32 (k, 28, 28): the digit in MNIST's size and centring, and for strokes
    wider than THICK the same thinned (k = 2), each centred by its own centre of mass."""
    ink = normalise(grey, photo)
    row_mass, col_mass = ink.sum(axis=1), ink.sum(axis=0)
    if not row_mass.any():  # blank: the model sees an empty frame, as it would an empty MNIST image
        return np.zeros((1, SIZE, SIZE), dtype=np.float32)
    if min(grey.shape) >= LARGE:  # a photo or a large drawing: a speck of dirt far off is no part of the digit
        top, bottom = ink_extent(row_mass)
        left, right = ink_extent(col_mass)
    else:
        rows, cols = np.flatnonzero(row_mass), np.flatnonzero(col_mass)
        top, bottom, left, right = rows[0], rows[-1], cols[0], cols[-1]
    ink = ink[top:bottom + 1, left:right + 1]
    digit = fit_box(ink)
    if digit is ink and not photo:  # already fits 20x20 (an MNIST digit): its sums are known
        return centre_in_frame(digit, row_mass[top:bottom + 1], col_mass[left:right + 1])[None]
    thin = thinned(ink)
    if thin is None:
        return centre_in_frame(digit)[None]
    return np.stack([centre_in_frame(digit), centre_in_frame(thin)])


def preprocess_views(data, budget=None):
    """Uploaded bytes -> float32 (k, 28, 28) in [0, 1]: the views of the digit the model scores (k = 1, or 2
    for thick strokes); the prediction is the mean of their probabilities (mean_over_views). Raises ImageError
    (its `status`: 400, UnsupportedImage 415, OverBudget 413). budget: the request's PixelBudget, one for all
    its files (None: each image is held to MAX_PIXELS alone)."""
    image = decode(data, budget, shrink=True)
    with _clean_errors():
        grey = grey_image(image)
    return digit_views(*work_image(grey))


def preprocess(data):
    """Uploaded bytes -> float32 (28, 28) in [0, 1], the digit as MNIST would have it (the first view).
    Raises ImageError."""
    return preprocess_views(data)[0]


def stack_views(views):
    """preprocess_views() of n uploads -> (images (m, 28, 28) for the model, starts: each upload's first row)."""
    if all(len(v) == 1 for v in views):
        return np.concatenate(views), None
    return np.concatenate(views), np.cumsum([0] + [len(v) for v in views[:-1]])


def mean_over_views(probabilities, starts):
    """The model's (m, 10) probabilities of stack_views' images -> (n, 10): each upload's mean over its views."""
    if starts is None:
        return probabilities
    counts = np.diff(np.append(starts, len(probabilities)))
    return np.add.reduceat(probabilities, starts, axis=0) / counts[:, None]
