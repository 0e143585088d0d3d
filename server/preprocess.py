"""Turn any uploaded image into a 28x28 MNIST-style input, the way MNIST itself was made.

Steps: decode (any mode Pillow opens, EXIF orientation applied, alpha composited onto white) ->
grey levels -> bright ink on dark ground (inverted when the border says the background is light) ->
contrast normalised -> cropped to the ink -> scaled to fit 20x20 keeping the aspect ratio ->
placed in 28x28 so that its centre of mass is at the centre.

Only Pillow and NumPy; no TensorFlow, so it is cheap to import and to test.
"""

import io
import struct
import warnings

import numpy as np
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

MAX_PIXELS = 40_000_000  # a 12000x12000 "decompression bomb" (144 MP) is refused before decoding
WORK_SIDE = 512  # larger images are reduced to about this before the pixel work (speed only)
BOX = 20  # MNIST: the digit is scaled to fit a 20x20 box ...
SIZE = 28  # ... inside a 28x28 image, centred by centre of mass
INK_THRESHOLD = 0.2  # after normalisation, levels below this are background (paper texture, JPEG noise)


class ImageError(ValueError):
    """The upload is not a usable image; the message says why (shown to the client)."""


def decode(data):
    """bytes -> a loaded, upright PIL image. Raises ImageError for anything unusable."""
    if not data:
        raise ImageError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit below
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width <= 0 or height <= 0:
                raise ImageError(f"image has zero size ({width}x{height})")
            if width * height > MAX_PIXELS:
                raise ImageError(f"image too large: {width}x{height} pixels (limit {MAX_PIXELS // 1_000_000} megapixels)")
            if image.format == "JPEG" and max(width, height) > 2 * WORK_SIDE:
                image.draft(image.mode, (WORK_SIDE, WORK_SIDE))  # decode JPEG at reduced scale: much faster
            image.load()
            image = ImageOps.exif_transpose(image)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not an image (or a format Pillow cannot read)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"image too large (limit {MAX_PIXELS // 1_000_000} megapixels)") from None
    except (OSError, SyntaxError, ValueError, EOFError, TypeError, IndexError, struct.error) as err:
        raise ImageError(f"truncated or corrupt image ({err})") from None
    if image.width <= 0 or image.height <= 0:
        raise ImageError("image has zero size")
    return image


def to_grey(image):
    """Any PIL image -> float32 2-D array of grey levels (arbitrary range), alpha composited onto white."""
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba).convert("L")
    elif image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return np.asarray(image, dtype=np.float32)
    elif image.mode == "1":
        image = image.convert("L")
    elif image.mode != "L":
        image = image.convert("RGB").convert("L")  # CMYK, YCbCr, LAB, HSV, P, RGB ...
    return np.asarray(image, dtype=np.float32)


def _resize(grey, size):
    """Resize a float array with Pillow (mode F keeps the precision); size is (width, height)."""
    return np.asarray(Image.fromarray(grey, mode="F").resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0))


def _median(values):
    """Median (upper middle element; np.median is several times slower on small arrays)."""
    middle = len(values) // 2
    return float(np.partition(values, middle)[middle])


def border_pixels(grey):
    """The outer ring of the image (about 5% of each side, at least one pixel)."""
    height, width = grey.shape
    band = max(1, min(height, width) // 20)
    return np.concatenate([grey[:band].ravel(), grey[-band:].ravel(), grey[:, :band].ravel(), grey[:, -band:].ravel()])


def normalise(grey):
    """Grey levels -> [0, 1] with the background at 0 and the ink at 1 (inverting a light background)."""
    low, high = float(grey.min()), float(grey.max())
    if high - low < 1e-6:
        return np.zeros_like(grey, dtype=np.float32)
    grey = (grey - low) / (high - low)
    background = _median(border_pixels(grey))
    if background > 0.5:  # light paper, dark ink: make the ink bright as in MNIST
        grey = 1.0 - grey
        background = 1.0 - background
    ink = float(grey.max())
    if ink - background < 0.1:  # nothing stands out from the background: a blank image
        return np.zeros_like(grey, dtype=np.float32)
    grey = np.clip((grey - background) / (ink - background), 0.0, 1.0)
    grey[grey < INK_THRESHOLD] = 0.0
    return grey.astype(np.float32)


def centre_in_frame(digit):
    """Place a (h<=20, w<=20) array in 28x28 with its centre of mass at the centre (as MNIST did)."""
    height, width = digit.shape
    total = float(digit.sum())
    rows, cols = np.indices(digit.shape)
    cy = float((rows * digit).sum() / total) if total else (height - 1) / 2
    cx = float((cols * digit).sum() / total) if total else (width - 1) / 2
    top = int(round((SIZE - 1) / 2 - cy))
    left = int(round((SIZE - 1) / 2 - cx))
    top = min(max(top, 0), SIZE - height)
    left = min(max(left, 0), SIZE - width)
    frame = np.zeros((SIZE, SIZE), dtype=np.float32)
    frame[top:top + height, left:left + width] = digit
    return frame


def to_mnist(grey):
    """Float grey array (any range, any polarity) -> float32 (28, 28) in [0, 1], ink bright."""
    grey = np.asarray(grey, dtype=np.float32)
    if grey.ndim != 2 or grey.size == 0:
        raise ImageError("image has zero size")
    height, width = grey.shape
    if max(height, width) > WORK_SIDE:
        scale = WORK_SIDE / max(height, width)
        grey = _resize(grey, (max(1, round(width * scale)), max(1, round(height * scale))))
    if min(grey.shape) >= 56:  # photos: a 3x3 median removes JPEG and sensor speckle before the crop
        span = float(grey.max() - grey.min()) or 1.0
        as_bytes = Image.fromarray(np.uint8(np.clip((grey - grey.min()) / span * 255, 0, 255)))
        grey = np.asarray(as_bytes.filter(ImageFilter.MedianFilter(3)), dtype=np.float32)
    ink = normalise(grey)
    rows = np.flatnonzero(ink.max(axis=1) > 0)
    cols = np.flatnonzero(ink.max(axis=0) > 0)
    if rows.size == 0:  # blank: the model sees an empty frame, as it would an empty MNIST image
        return np.zeros((SIZE, SIZE), dtype=np.float32)
    ink = ink[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    height, width = ink.shape
    scale = BOX / max(height, width)
    new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if new_size != (width, height):
        ink = _resize(ink, new_size)
        ink = np.clip(ink, 0.0, None)
        peak = float(ink.max())
        if peak > 0:
            ink = ink / peak  # thin strokes shrunk a lot get faint: restore full contrast
    return centre_in_frame(np.clip(ink, 0.0, 1.0).astype(np.float32))


def preprocess(data):
    """Uploaded bytes -> float32 (28, 28) in [0, 1] ready for the model. Raises ImageError."""
    return to_mnist(to_grey(decode(data)))
