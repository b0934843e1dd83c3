"""Deterministic placeholder images for the emulator, rendered with Pillow.

Pillow is imported inside the functions on purpose: importing the emulator package
(and therefore ``airflow_flux``) must stay cheap for DAG parsing.
"""

from __future__ import annotations

import hashlib
import io
import math
import random
import struct
import textwrap
import threading
import zlib
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Sequence

#: FLUX.1 Kontext [pro] output sizes per aspect ratio (width, height).
ASPECT_RATIO_SIZES: dict[str, tuple[int, int]] = {
    "21:9": (1568, 672),
    "16:9": (1392, 752),
    "4:3": (1184, 880),
    "3:2": (1248, 832),
    "1:1": (1024, 1024),
    "2:3": (832, 1248),
    "3:4": (880, 1184),
    "9:16": (752, 1392),
    "9:21": (672, 1568),
}

OUTPUT_FORMATS: tuple[str, ...] = ("jpeg", "png")

_MAX_TEXT_LINES = 6
_JPEG_SEGMENT_PAYLOAD = 65533  # 0xFFFF minus the two length bytes
_PAD_BLOCK_SIZE = 64 * 1024


def image_size(aspect_ratio: str | None) -> tuple[int, int]:
    """Return (width, height) for an aspect ratio, falling back to 1:1 like the model default."""
    return ASPECT_RATIO_SIZES.get(aspect_ratio or "1:1", ASPECT_RATIO_SIZES["1:1"])


def nearest_aspect_ratio(width: int, height: int) -> str:
    """The supported aspect ratio closest to ``width:height`` (what an edit keeps by default)."""
    if width <= 0 or height <= 0:
        return "1:1"
    target = math.log(width / height)
    return min(ASPECT_RATIO_SIZES, key=lambda r: abs(math.log(_ratio(r)) - target))


def _ratio(aspect_ratio: str) -> float:
    w, h = ASPECT_RATIO_SIZES[aspect_ratio]
    return w / h


def probe_image(data: bytes) -> tuple[int, int, str]:
    """``(width, height, format)`` of an encoded image; raises if Pillow cannot decode it.

    The whole image is decoded, so a truncated file is refused too. Call it off the event loop.
    """
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            size, fmt = img.size, img.format or "unknown"
            img.load()
    except Image.UnidentifiedImageError:
        # Pillow's own message names a BytesIO object's address: not worth echoing.
        raise ValueError("cannot identify image file") from None
    return size[0], size[1], fmt


def normalize_format(output_format: str | None) -> str:
    """Map an ``output_format`` value to ``"jpeg"`` or ``"png"`` (anything else means jpeg)."""
    return "png" if output_format == "png" else "jpeg"


def content_type_for(output_format: str | None) -> str:
    """MIME type of an output format."""
    return "image/png" if normalize_format(output_format) == "png" else "image/jpeg"


def extension_for(output_format: str | None) -> str:
    """File extension (without dot) used in CDN URLs and file names."""
    return "png" if normalize_format(output_format) == "png" else "jpg"


def _palette(digest: bytes, offset: int) -> tuple[int, int, int]:
    return digest[offset], digest[offset + 1], digest[offset + 2]


def render_image(
    prompt: str,
    seed: int,
    index: int,
    *,
    aspect_ratio: str | None = "1:1",
    output_format: str | None = "jpeg",
    min_bytes: int | None = None,
    blank: bool = False,
    inputs: Sequence[bytes] | None = None,
    dimensions: tuple[int, int] | None = None,
) -> bytes:
    """Render one image and return its encoded bytes.

    The output depends only on the arguments, so a re-render after a cache eviction
    yields identical bytes (the CDN must serve stable content). ``blank`` renders a
    black frame, which is what FLUX returns for images flagged as NSFW.
    ``min_bytes`` pads the file with an ignorable segment/chunk so that it is at least
    that large while staying a valid image of the same size and format.

    ``dimensions`` (width, height) win over ``aspect_ratio`` (FLUX.2's ``image_size``).
    ``inputs`` (the encoded input images of an edit or multi request) replace the
    gradient: see :func:`_derived_base` for how the output is derived from them. The
    caption band is drawn on either.
    """
    from PIL import Image, ImageDraw, ImageFont

    width, height = dimensions or image_size(aspect_ratio)
    fmt = normalize_format(output_format)
    digest = hashlib.sha256(f"{prompt}\x00{seed}\x00{index}".encode()).digest()

    if blank:
        img = Image.new("RGB", (width, height), (0, 0, 0))
    elif inputs:
        img = _derived_base(inputs, width, height)
        label = f"edit of {len(inputs)} input{'s' if len(inputs) > 1 else ''}"
        _draw_caption(ImageDraw.Draw(img), ImageFont, prompt, seed, index, width, height, label)
    else:
        # Gradient between two colours at a hash-derived angle; built at 256x256 and
        # scaled up because per-pixel work at full size would be far too slow.
        # Only the central square of a rotated 256x256 gradient is free of fill corners.
        mask = Image.linear_gradient("L").rotate(digest[9] * 360 / 256, resample=Image.Resampling.BILINEAR)
        mask = mask.crop((38, 38, 218, 218)).resize((width, height), Image.Resampling.BILINEAR)
        img = Image.composite(
            Image.new("RGB", (width, height), _palette(digest, 0)),
            Image.new("RGB", (width, height), _palette(digest, 3)),
            mask,
        )
        draw = ImageDraw.Draw(img)
        rng = random.Random(digest)
        for i in range(3 + digest[10] % 4):
            x0 = rng.randrange(width)
            y0 = rng.randrange(height)
            size = rng.randrange(min(width, height) // 10, min(width, height) // 2)
            colour = _palette(digest, 12 + 3 * (i % 6))
            box = (x0 - size // 2, y0 - size // 2, x0 + size // 2, y0 + size // 2)
            if rng.random() < 0.5:
                draw.ellipse(box, fill=colour, outline=(255, 255, 255), width=3)
            else:
                draw.rectangle(box, fill=colour, outline=(0, 0, 0), width=3)
        _draw_caption(draw, ImageFont, prompt, seed, index, width, height)

    buf = io.BytesIO()
    if fmt == "png":
        # Low compression keeps a 1 MP render well under 100 ms.
        img.save(buf, format="PNG", compress_level=1)
    else:
        img.save(buf, format="JPEG", quality=85)
    data = buf.getvalue()
    if min_bytes is not None and len(data) < min_bytes:
        data = _pad(data, fmt, min_bytes - len(data), digest)
    return data


def _load_font(image_font: Any, size: int) -> Any:
    try:
        return image_font.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow < 10.1 or no FreeType
        return image_font.load_default()


def _derived_base(inputs: Sequence[bytes], width: int, height: int) -> Any:
    """The output of an edit, derived visibly from its input images (no model, of course).

    The output (``width`` x ``height``) is cut into as many vertical strips of equal width
    as there are inputs, left to right in input order; strip ``i`` shows input ``i`` scaled
    to *cover* the strip, keeping its aspect ratio, and centre-cropped (``ImageOps.fit``).
    One input (an edit) fills the whole image, so a solid red input gives a red output
    away from the caption band at the bottom; two inputs give a left and a right half.
    """
    from PIL import Image, ImageOps

    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    count = len(inputs)
    for i, data in enumerate(inputs):
        left, right = i * width // count, (i + 1) * width // count
        size = (max(1, right - left), height)
        with Image.open(io.BytesIO(data)) as src:
            src.draft("RGB", size)  # cheap JPEG downscale while decoding
            tile = ImageOps.fit(src.convert("RGB"), size, Image.Resampling.BILINEAR)
        canvas.paste(tile, (left, 0))
    return canvas


def _draw_caption(
    draw: Any,
    image_font: Any,
    prompt: str,
    seed: int,
    index: int,
    width: int,
    height: int,
    label: str | None = None,
) -> None:
    font_size = max(16, width // 36)
    font = _load_font(image_font, font_size)
    chars_per_line = max(10, int(width * 0.9 / (font_size * 0.55)))
    lines = textwrap.wrap(prompt, width=chars_per_line) or [""]
    if len(lines) > _MAX_TEXT_LINES:
        lines = lines[:_MAX_TEXT_LINES]
        lines[-1] = lines[-1][: max(0, chars_per_line - 1)] + "…"
    # Counted from 1, as the gallery shows images (fal's index, and the S3 key, start at 0).
    lines.append(f"FLUX emulator · seed {seed} · image {index + 1}" + (f" · {label}" if label else ""))
    line_height = int(font_size * 1.3)
    block_height = line_height * len(lines) + font_size
    top = height - block_height - height // 20
    draw.rectangle((0, top, width, top + block_height), fill=(0, 0, 0))
    y = top + font_size // 2
    for line in lines:
        try:
            draw.text((width // 20, y), line, fill=(255, 255, 255), font=font)
        except UnicodeEncodeError:  # the bitmap fallback font is latin-1 only
            safe = line.encode("latin-1", "replace").decode("latin-1")
            draw.text((width // 20, y), safe, fill=(255, 255, 255), font=font)
        y += line_height


def _filler(digest: bytes, size: int) -> bytes:
    """Deterministic incompressible-looking filler; a repeated random block is fast."""
    block = random.Random(digest).randbytes(_PAD_BLOCK_SIZE)
    reps = size // _PAD_BLOCK_SIZE + 1
    return (block * reps)[:size]


def _pad(data: bytes, fmt: str, deficit: int, digest: bytes) -> bytes:
    if fmt == "png":
        # A private, ancillary, safe-to-copy chunk ("paDd") before IEND: decoders skip it.
        payload = _filler(digest, max(0, deficit - 12))
        chunk_type = b"paDd"
        chunk = (
            struct.pack(">I", len(payload))
            + chunk_type
            + payload
            + struct.pack(">I", zlib.crc32(chunk_type + payload) & 0xFFFFFFFF)
        )
        iend = data.rfind(b"IEND") - 4
        return data[:iend] + chunk + data[iend:]
    # JPEG: COM segments right after SOI; each holds at most 65533 payload bytes.
    segments: list[bytes] = []
    remaining = deficit
    filler = _filler(digest, deficit)
    pos = 0
    while remaining > 0:
        payload_len = min(_JPEG_SEGMENT_PAYLOAD, max(0, remaining - 4))
        payload = filler[pos : pos + payload_len]
        pos += payload_len
        segments.append(b"\xff\xfe" + struct.pack(">H", payload_len + 2) + payload)
        remaining -= payload_len + 4
    return data[:2] + b"".join(segments) + data[2:]


class ImageCache:
    """Small thread-safe LRU of rendered image bytes, bounded by entries and total bytes."""

    def __init__(self, max_entries: int = 256, max_bytes: int = 512 * 1024 * 1024) -> None:
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._items: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, key: tuple[str, int]) -> bytes | None:
        """Return cached bytes (marking them recently used) or None."""
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
            return data

    def put(self, key: tuple[str, int], data: bytes) -> None:
        """Store bytes, evicting least recently used entries beyond the bounds."""
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._size -= len(old)
            self._items[key] = data
            self._size += len(data)
            # Always keep the newest entry, even if it alone exceeds max_bytes.
            while len(self._items) > 1 and (len(self._items) > self._max_entries or self._size > self._max_bytes):
                _, evicted = self._items.popitem(last=False)
                self._size -= len(evicted)

    def clear(self) -> None:
        """Drop everything."""
        with self._lock:
            self._items.clear()
            self._size = 0
