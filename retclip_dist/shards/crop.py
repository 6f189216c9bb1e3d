"""--crop fundus: find the circular field of view of a fundus photo, crop to its bounding square and black
out everything outside the circle.

Cameras burn the patient's name, id and date into the black corners outside the field, so the crop is a
de-identification step as much as the usual retinal preprocessing (more retina per pixel, no borders).

The field is found on a copy reduced to at most _WORK_SIDE pixels: pixels brighter than a threshold
between the background and the field's typical brightness form a mask; the longest bright run of every
row and column gives two boundary points (those at the frame's edge are cuts of the frame, not of the
field, and are left out, so a field cut off at the top and bottom is still found); a seeded RANSAC circle
fit ignores points from burned-in text or dark lesions, and a least-squares fit on its inliers refines it.
A result that does not look like a fundus field (too few boundary points on the circle, too little of
the circumference seen, a circle too small or too large, a field not filled) is None: the caller rejects
the image as ``no_fundus_field`` rather than crop a non-fundus image somewhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# The field is searched on a copy whose longer side is at most this (radius error ~0.5 px of ~100).
_WORK_SIDE = 256
# Threshold = background + this share of (typical field brightness - background): dim peripheries of
# real photos stay inside the field while JPEG noise and ringing in the black corners stay outside.
_THRESHOLD_SHARE = 0.3
# Less contrast than this (8-bit levels) between field and background is not a photo of a field.
_MIN_CONTRAST = 12
# A row's or column's longest bright run shorter than this share of the working side gives no boundary
# point: glyphs of burned-in text are short runs.
_MIN_RUN_SHARE = 0.04
_RANSAC_ROUNDS = 256
_RANSAC_SCORED = 400  # candidate circles are scored on about this many of the boundary points
# A boundary point within this share of the working shorter side of the circle is on it.
_INLIER_SHARE = 0.012
_MIN_INLIER_SHARE = 0.5  # of all boundary points
_MIN_POINTS = 24
# Share of the circumference (in 10-degree bins) that must carry inliers: a field cut off at the top
# and bottom to 60% of its diameter still shows about 40%.
_MIN_ARC_SHARE = 0.3
_MIN_RADIUS_SHARE = 0.2  # of the shorter side
_MAX_RADIUS_SHARE = 0.75  # of the longer side
_MIN_FILL = 0.85  # bright share of the circle's part inside the frame
_MAX_OUTSIDE_FILL = 0.2  # bright share of the frame outside the circle (text, light leaks)


@dataclass(frozen=True)
class Circle:
    """A circle in pixel coordinates of the image it was found in (pixel (i, j) spans [i, i+1))."""

    cx: float  # centre, x
    cy: float  # centre, y
    r: float  # radius

    def scaled(self, sx: float, sy: float | None = None) -> Circle:
        sy = sx if sy is None else sy
        return Circle(self.cx * sx, self.cy * sy, self.r * (sx + sy) / 2)


def _threshold(grey: np.ndarray) -> float | None:
    """Mask threshold, or None for an image without a dark background and a brighter field."""
    bg = float(np.percentile(grey, 1))
    hist = np.bincount(grey.ravel(), minlength=256).astype(np.float64)
    # Otsu's split between background and field; the field's median above it is its typical brightness
    # (bright burned-in text is a small share of those pixels, so it hardly moves the median).
    levels = np.arange(256, dtype=np.float64)
    w0 = np.cumsum(hist)
    m0 = np.cumsum(hist * levels)
    total, mean_all = w0[-1], m0[-1]
    w1 = total - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mean_all * w0 / total - m0) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = -1
    otsu = int(np.argmax(between))
    above = grey[grey > otsu]
    if above.size == 0:
        return None
    field = float(np.median(above))
    if field - bg < _MIN_CONTRAST:
        return None
    return bg + max(4.0, _THRESHOLD_SHARE * (field - bg))


def _longest_runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(line index, run start, run end exclusive) of the longest True run of each line with one."""
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    step = np.diff(padded, axis=1)
    starts = np.argwhere(step == 1)  # row-major, so starts and ends pair up line by line
    ends = np.argwhere(step == -1)
    if starts.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    lines, begin, end = starts[:, 0], starts[:, 1], ends[:, 1]
    order = np.lexsort((end - begin, lines))  # by line, then length: the last of each line is longest
    lines, begin, end = lines[order], begin[order], end[order]
    last = np.r_[lines[1:] != lines[:-1], True]
    return lines[last], begin[last], end[last]


def _boundary_points(mask: np.ndarray) -> np.ndarray:
    """Boundary points (x, y) of the longest run of every row and column, frame edges left out."""
    h, w = mask.shape
    min_run = max(3, round(_MIN_RUN_SHARE * min(h, w)))
    points = []
    for along_rows, m, extent in ((True, mask, w), (False, mask.T, h)):
        line, begin, end = _longest_runs(m)
        keep = end - begin >= min_run
        line, begin, end = line[keep], begin[keep], end[keep]
        centre = line + 0.5
        for edge, inside in ((begin, begin > 0), (end, end < extent)):
            pts = np.stack([edge[inside], centre[inside]], axis=1).astype(np.float64)
            points.append(pts if along_rows else pts[:, ::-1])
    return np.concatenate(points) if points else np.zeros((0, 2))


def _circle_through(p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Circles through point triples p[k, 3, 2]: centres x, y and radii (nan where collinear)."""
    ax, bx, cx = p[:, 0, 0], p[:, 1, 0], p[:, 2, 0]
    ay, by, cy = p[:, 0, 1], p[:, 1, 1], p[:, 2, 1]
    d = 2 * (ax * (by - cy) + bx * (cy - ay) + cx * (ay - by))
    with np.errstate(divide="ignore", invalid="ignore"):
        a2, b2, c2 = ax * ax + ay * ay, bx * bx + by * by, cx * cx + cy * cy
        ux = (a2 * (by - cy) + b2 * (cy - ay) + c2 * (ay - by)) / d
        uy = (a2 * (cx - bx) + b2 * (ax - cx) + c2 * (bx - ax)) / d
    return ux, uy, np.hypot(ax - ux, ay - uy)


def _least_squares(points: np.ndarray) -> Circle:
    """Algebraic (Kasa) circle fit: x^2 + y^2 + D x + E y + F = 0 in the least-squares sense."""
    x, y = points[:, 0], points[:, 1]
    design = np.stack([x, y, np.ones_like(x)], axis=1)
    (d, e, f), *_ = np.linalg.lstsq(design, -(x * x + y * y), rcond=None)
    cx, cy = -d / 2, -e / 2
    return Circle(float(cx), float(cy), float(math.sqrt(max(cx * cx + cy * cy - f, 0.0))))


def _fit(points: np.ndarray, tolerance: float) -> tuple[Circle, np.ndarray] | None:
    """Seeded RANSAC over point triples, then least squares on the inliers (twice)."""
    rng = np.random.default_rng(0)  # fixed: the same image always gives the same crop
    triples = points[rng.integers(0, len(points), size=(_RANSAC_ROUNDS, 3))]
    ux, uy, r = _circle_through(triples)
    scored = points[:: max(1, len(points) // _RANSAC_SCORED)]
    with np.errstate(invalid="ignore"):
        dist = np.hypot(scored[None, :, 0] - ux[:, None], scored[None, :, 1] - uy[:, None])
        counts = np.where(np.isfinite(r), (np.abs(dist - r[:, None]) < tolerance).sum(axis=1), -1)
    best = int(np.argmax(counts))
    if counts[best] < 3:
        return None
    circle = Circle(float(ux[best]), float(uy[best]), float(r[best]))
    inliers = np.abs(np.hypot(points[:, 0] - circle.cx, points[:, 1] - circle.cy) - circle.r) < tolerance
    for _ in range(2):
        circle = _least_squares(points[inliers])
        inliers = np.abs(np.hypot(points[:, 0] - circle.cx, points[:, 1] - circle.cy) - circle.r) < tolerance
        if inliers.sum() < 3:
            return None
    return circle, inliers


def _plausible(circle: Circle, points: np.ndarray, inliers: np.ndarray, mask: np.ndarray) -> bool:
    h, w = mask.shape
    if inliers.sum() < max(_MIN_POINTS, _MIN_INLIER_SHARE * len(points)):
        return False
    if not (_MIN_RADIUS_SHARE * min(h, w) <= circle.r <= _MAX_RADIUS_SHARE * max(h, w)):
        return False
    if not (0 <= circle.cx <= w and 0 <= circle.cy <= h):
        return False
    angles = np.arctan2(points[inliers, 1] - circle.cy, points[inliers, 0] - circle.cx)
    bins = np.unique(np.floor((angles + np.pi) / (2 * np.pi) * 36).astype(int) % 36)
    if len(bins) < _MIN_ARC_SHARE * 36:
        return False
    yy, xx = np.mgrid[0:h, 0:w]
    inside = np.hypot(xx + 0.5 - circle.cx, yy + 0.5 - circle.cy) <= circle.r
    fill = mask[inside].mean() if inside.any() else 0.0
    outside = mask[~inside].mean() if (~inside).any() else 0.0
    return fill >= _MIN_FILL and outside <= _MAX_OUTSIDE_FILL


def find_fundus_field(img: Image.Image) -> Circle | None:
    """The circular field of view of an RGB or greyscale photo in its pixel coordinates, or None."""
    factor = max(1, math.ceil(max(img.size) / _WORK_SIDE))
    small = img.reduce(factor) if factor > 1 else img
    arr = np.asarray(small)
    grey = arr.max(axis=2) if arr.ndim == 3 else arr  # the fundus is red: the brightest channel sees it
    grey = grey.astype(np.uint8)
    threshold = _threshold(grey)
    if threshold is None:
        return None
    mask = grey > threshold
    points = _boundary_points(mask)
    if len(points) < _MIN_POINTS:
        return None
    found = _fit(points, max(1.0, _INLIER_SHARE * min(mask.shape)))
    if found is None or not _plausible(found[0], points, found[1], mask):
        return None
    # reduce() maps block i to pixels [i*factor, (i+1)*factor), so coordinates scale by the factor.
    return found[0].scaled(factor)


def outside_mask(size: tuple[int, int], circle: Circle) -> np.ndarray:
    """True for the pixels (by their centres) of a width x height image that lie outside ``circle``."""
    w, h = size
    yy, xx = np.ogrid[0:h, 0:w]
    return (xx + 0.5 - circle.cx) ** 2 + (yy + 0.5 - circle.cy) ** 2 > circle.r**2


def crop_to_field(img: Image.Image, circle: Circle, side: int) -> Image.Image:
    """The bounding square of ``circle`` resampled to ``side`` x ``side``: the circle becomes the square's
    inscribed circle, and every pixel outside it is black.

    Parts of the square beyond the frame (a field cut off at the top and bottom) are black. The image is
    blacked out outside the circle before resampling too, so no burned-in text blends into edge pixels.
    """
    left, top = math.floor(circle.cx - circle.r) - 2, math.floor(circle.cy - circle.r) - 2
    full = math.ceil(2 * circle.r) + 5
    padded = img.crop((left, top, left + full, top + full))  # PIL fills beyond the frame with black
    inner = Circle(circle.cx - left, circle.cy - top, circle.r)
    keep = Image.new("L", padded.size, 0)
    ImageDraw.Draw(keep).ellipse(
        (inner.cx - inner.r, inner.cy - inner.r, inner.cx + inner.r, inner.cy + inner.r), fill=255
    )
    padded = Image.composite(padded, Image.new(padded.mode, padded.size), keep)
    box = (inner.cx - inner.r, inner.cy - inner.r, inner.cx + inner.r, inner.cy + inner.r)
    square = padded.resize((side, side), Image.Resampling.BICUBIC, box=box)
    # Resampling rings a little past the edge; the final mask makes "outside is black" exact.
    pixels = np.array(square)
    pixels[outside_mask(square.size, Circle(side / 2, side / 2, side / 2))] = 0
    return Image.fromarray(pixels, square.mode)
