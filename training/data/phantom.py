"""Built-in synthetic cardiac phantom: the embedded default dataset (quick start and tests need no download).

Each volume imitates a stack of short-axis cine-MRI slices (base to apex): a body ellipse with a bright
subcutaneous fat layer and textured muscle, dark lungs, descending aorta and spine, and the heart in the
ACDC label convention (0 background, 1 RV, 2 myocardium, 3 LV).

Every foreground class is deliberately made of two intensity sub-regions, because multi-prototype methods
(several prototypes per class aligned with intensity sub-ranges) need intra-class heterogeneity to be
exercised at all:

* LV: bright blood pool (sub-region 1) with darker papillary muscles and trabeculations (sub-region 0);
* myocardium: mid-grey ring (sub-region 0) with a clearly brighter 90-150 degree sector (sub-region 1),
  imitating partial volume or late enhancement;
* RV: bright blood (sub-region 1) with a darker moderator band and trabeculated free-wall rim (sub-region 0).

The sub-region map is returned alongside each volume so tests and prototype diagnostics can check it.
All randomness flows from a ``numpy.random.Generator`` built from the seed; nothing touches global state,
so the same seed always gives byte-identical arrays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage

from mpcl.errors import ConfigError

from .base import SegmentationData, Slice2D, Volume

CLASS_NAMES: tuple[str, ...] = ("background", "RV", "myocardium", "LV")
BACKGROUND, RV, MYO, LV = 0, 1, 2, 3

# Volume ``i`` of ``make_phantom_data(seed)`` is ``make_phantom_volume(seed * SEED_STRIDE + i)``: a fixed
# stride keeps every volume seed distinct, within one dataset and across dataset seeds.
SEED_STRIDE = 10_000

# Base tissue intensities before bias, noise and per-volume contrast jitter (bSSFP-like: blood and fat
# bright, myocardium and muscle dark, lungs black). The dark/bright pairs of each class differ by >= 0.3.
_TISSUE = {
    "air": 0.0,
    "fat": 0.70,
    "muscle": 0.30,
    "lung": 0.05,
    "aorta": 0.80,
    "cortex": 0.12,
    "marrow": 0.42,
    "rv_wall": 0.26,
    "lv_bright": 0.90,
    "lv_dark": 0.46,
    "myo_dark": 0.26,
    "myo_bright": 0.62,
    "rv_bright": 0.84,
    "rv_dark": 0.47,
}


@dataclass(frozen=True)
class PhantomSpec:
    """Knobs of the phantom; defaults give 128x128 slices at ACDC-like resolution (1.5 x 1.5 x 8 mm)."""

    size: tuple[int, int] = (128, 128)  # (H, W)
    slices_per_volume: int = 8
    spacing: tuple[float, float, float] = (1.5, 1.5, 8.0)  # (x, y, z) mm
    noise_std: float = 0.03  # Rician noise sigma, relative to a blood intensity of ~0.9
    bias_strength: float = 0.2  # bias field is exp(bias_strength * f), f in [-1, 1]
    contrast_jitter: float = 0.08  # relative per-volume jitter of each tissue intensity
    gamma_jitter: float = 0.12  # global gamma drawn from [1 - g, 1 + g]
    psf_sigma: float = 0.6  # in-plane Gaussian blur (pixels) for partial-volume edges
    texture_strength: float = 1.0  # scales the smooth multiplicative tissue texture

    def __post_init__(self) -> None:
        if len(self.size) != 2 or len(self.spacing) != 3:
            raise ConfigError(
                f"PhantomSpec needs size (H, W) and spacing (x, y, z), got {self.size!r}, {self.spacing!r}."
            )
        # Accept lists from configs; store canonical tuples so specs compare and hash predictably.
        object.__setattr__(self, "size", (int(self.size[0]), int(self.size[1])))
        object.__setattr__(self, "spacing", tuple(float(v) for v in self.spacing))
        h, w = self.size
        if h < 32 or w < 32:
            raise ConfigError(f"PhantomSpec.size must be at least (32, 32), got {self.size}.")
        if self.slices_per_volume < 1:
            raise ConfigError(f"PhantomSpec.slices_per_volume must be >= 1, got {self.slices_per_volume}.")
        if min(self.spacing) <= 0:
            raise ConfigError(f"PhantomSpec.spacing must be three positive numbers, got {self.spacing}.")
        for key in ("noise_std", "bias_strength", "psf_sigma", "texture_strength"):
            if getattr(self, key) < 0:
                raise ConfigError(f"PhantomSpec.{key} must be >= 0, got {getattr(self, key)}.")
        # Larger jitters could invert the dark/bright sub-region order the phantom guarantees.
        if not 0 <= self.contrast_jitter <= 0.15 or not 0 <= self.gamma_jitter <= 0.3:
            raise ConfigError(
                "PhantomSpec.contrast_jitter must be in [0, 0.15] and gamma_jitter in "
                f"[0, 0.3], got {self.contrast_jitter}, {self.gamma_jitter}."
            )


@dataclass(frozen=True)
class _Anatomy:
    """Per-volume random anatomy parameters, in pixels (already scaled to the slice size)."""

    body: tuple[float, float, float, float, float]  # cx, cy, ax, ay, fat thickness
    heart: tuple[float, float, float, float]  # cx, cy, drift x, drift y (base -> apex)
    lv_shape: tuple[float, ...]  # basal radius, apex ratio, ellipticity, rotation, c2, p2, c3, p3
    myo: tuple[float, float, float]  # thickness, angular modulation, phase
    septal_angle: float
    rv: tuple[float, float, float, float, float]  # offset, depth, width, tilt, apical shrink
    bright_sector: tuple[float, float]  # centre, width (radians)
    papillary: tuple[tuple[float, float, float], ...]  # (angle from septal axis, radial pos, radius) each
    trabeculae: tuple[int, float, int, float]  # two angular frequencies and phases
    rv_dark: tuple[float, float, float, float]  # band angle, band width, rim sector start, rim sector width
    lungs: tuple[tuple[float, ...], ...]  # cx, cy, ax, ay, c2, p2, c3, p3 each
    aorta: tuple[float, float, float]  # cx, cy, r
    spine: tuple[float, float, float]  # cx, cy, r
    peri_fat: tuple[float, float]  # thickness, phase
    intensities: dict[str, float]  # per-volume tissue intensities, contrast jitter and gamma applied
    bias: tuple[float, ...]  # polynomial coefficients of the bias field


def _harm(rng: np.random.Generator, amp: float) -> tuple[float, float, float, float]:
    """Random (c2, p2, c3, p3) outline harmonics for ``_Polar.harmonics``."""
    u = rng.uniform
    return (u(0, amp), u(0, 2 * math.pi), u(0, amp / 2), u(0, 2 * math.pi))


def _sample_anatomy(rng: np.random.Generator, spec: PhantomSpec) -> _Anatomy:
    """Draw one plausible heart/torso configuration; every draw happens in a fixed order for determinism."""
    h, w = spec.size
    s = min(h, w) / 128.0
    u = rng.uniform

    bcx, bcy = w / 2 + u(-3, 3) * s, h / 2 + u(-2, 4) * s
    bax, bay = u(0.41, 0.46) * w, u(0.31, 0.36) * h
    body = (bcx, bcy, bax, bay, u(3.0, 5.5) * s)

    heart = (bcx + u(5, 10) * s, bcy + u(-7, 0) * s, u(-3, 3) * s, u(-3, 3) * s)
    # basal cavity radius, apical/basal radius ratio, ellipticity, ellipse rotation, outline harmonics
    lv_shape = (u(11.5, 15.0) * s, u(0.28, 0.42), u(0.86, 1.16), u(0, math.pi)) + _harm(rng, 0.06)
    myo = (u(4.5, 7.0) * s, u(0.0, 0.2), u(0, 2 * math.pi))
    septal = 7 * math.pi / 6 + u(-0.3, 0.3)  # RV sits left-anterior of the LV in image coordinates
    rv = (u(0.82, 0.95), u(0.68, 0.82), u(1.3, 1.6), u(-0.25, 0.25), u(0.55, 0.75))
    bright_sector = (u(0, 2 * math.pi), math.radians(u(90, 150)))
    papillary = tuple((math.pi + sign * u(0.55, 0.95), u(0.6, 0.7), u(0.24, 0.3)) for sign in (-1.0, 1.0))
    trabeculae = (int(rng.integers(7, 12)), u(0, 2 * math.pi), int(rng.integers(3, 6)), u(0, 2 * math.pi))
    rv_dark = (u(-0.45, 0.45), u(3.0, 4.5) * s, u(-1.2, -0.2), u(1.0, 1.6))

    hcx, hcy = heart[0], heart[1]
    lungs = (
        # patient left (lateral to the LV), then patient right; outlines get random low-order harmonics
        (hcx + u(26, 32) * s, hcy + u(-6, 2) * s, u(10, 13) * s, u(20, 26) * s) + _harm(rng, 0.1),
        (bcx - bax * u(0.5, 0.6), bcy + u(-4, 4) * s, u(10, 13) * s, u(17, 23) * s) + _harm(rng, 0.1),
    )
    aorta = (bcx + u(6, 11) * s, bcy + bay * u(0.6, 0.68), u(5.0, 6.5) * s)
    spine = (bcx + u(-3, 1) * s, bcy + bay * u(0.8, 0.86), u(7.0, 8.5) * s)
    peri_fat = (u(1.5, 3.0) * s, u(0, 2 * math.pi))

    # Per-volume contrast: every tissue jittered, then one global gamma (applied to the tissue table, which
    # is equivalent to a pixel-wise gamma before texture/blur and much cheaper).
    cj = spec.contrast_jitter
    jittered = {name: value * u(1 - cj, 1 + cj) for name, value in _TISSUE.items()}
    gamma = u(1 - spec.gamma_jitter, 1 + spec.gamma_jitter)
    intensities = {name: value**gamma for name, value in jittered.items()}
    bias = tuple(rng.normal(0.0, 1.0, size=6).tolist())
    return _Anatomy(
        body,
        heart,
        lv_shape,
        myo,
        septal,
        rv,
        bright_sector,
        papillary,
        trabeculae,
        rv_dark,
        lungs,
        aorta,
        spine,
        peri_fat,
        intensities,
        bias,
    )


def _ellipse(
    xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, ax: float, ay: float, rot: float = 0.0
) -> np.ndarray:
    """Normalised elliptical radius (<= 1 inside), so masks and rims come from one expression."""
    dx, dy = xx - cx, yy - cy
    c, s = math.cos(rot), math.sin(rot)
    return np.sqrt(((dx * c + dy * s) / ax) ** 2 + ((-dx * s + dy * c) / ay) ** 2)


def _ellipse_extent(ax: float, ay: float, rot: float) -> tuple[float, float]:
    """Half-extent (x, y) of a rotated ellipse, to size the heart's region of interest tightly."""
    c, s = math.cos(rot), math.sin(rot)
    return math.hypot(ax * c, ay * s), math.hypot(ax * s, ay * c)


class _Polar:
    """Unit direction (cos theta, sin theta) around a centre; angular terms use trig identities, not atan2."""

    def __init__(self, xx: np.ndarray, yy: np.ndarray, cx: float, cy: float) -> None:
        self.dx, self.dy = xx - cx, yy - cy
        rho = np.maximum(np.hypot(self.dx, self.dy), 1e-3)
        self.c, self.s = self.dx / rho, self.dy / rho

    def cos(self, phase: float) -> np.ndarray:
        """cos(theta - phase): angular sectors and smooth angular modulations."""
        return self.c * math.cos(phase) + self.s * math.sin(phase)

    def harmonics(self, c2: float, p2: float, c3: float, p3: float) -> np.ndarray:
        """1 + c2 cos(2 theta + p2) + c3 cos(3 theta + p3): a smooth, non-elliptical outline."""
        cos2, sin2 = self.c * self.c - self.s * self.s, 2.0 * self.c * self.s
        cos3, sin3 = cos2 * self.c - sin2 * self.s, sin2 * self.c + cos2 * self.s
        out = 1.0 + c2 * (cos2 * math.cos(p2) - sin2 * math.sin(p2))
        return out + c3 * (cos3 * math.cos(p3) - sin3 * math.sin(p3))


def _dist_to(mask: np.ndarray, reach: float) -> np.ndarray:
    """Euclidean distance to ``mask`` for pixels within ``reach`` of its bounding box (inf beyond).

    Cropping to the mask's bounding box keeps the distance transform cheap; results inside the crop are
    exact because every mask pixel lies inside it.
    """
    out = np.full(mask.shape, np.inf, dtype=np.float32)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return out
    m = int(math.ceil(reach)) + 1
    r0, r1 = max(rows[0] - m, 0), min(rows[-1] + m + 1, mask.shape[0])
    c0, c1 = max(cols[0] - m, 0), min(cols[-1] + m + 1, mask.shape[1])
    out[r0:r1, c0:c1] = ndimage.distance_transform_edt(~mask[r0:r1, c0:c1])
    return out


@dataclass(frozen=True)
class _Torso:
    """Slice-independent torso rendering plus what each slice needs to add the lungs."""

    img: np.ndarray  # intensities: textured muscle with fat streaks, subcutaneous fat, aorta, spine
    amp: np.ndarray  # per-pixel texture amplitude
    lung_r: np.ndarray  # min over lungs of normalised radius; a slice's lungs are ``lung_r <= scale``


def _render_torso(a: _Anatomy, xx: np.ndarray, yy: np.ndarray, streaks: np.ndarray) -> _Torso:
    """Paint what does not change along the stack once per volume (the slices only differ by heart/lungs)."""
    it = a.intensities
    img = np.full(xx.shape, it["air"], dtype=np.float32)
    amp = np.zeros(xx.shape, dtype=np.float32)
    bcx, bcy, bax, bay, fat_t = a.body
    body_r = _ellipse(xx, yy, bcx, bcy, bax, bay)
    body = body_r <= 1.0
    acx, acy, ar = a.aorta
    scx, scy, sr = a.spine
    for mask, tissue, gain in (
        (body, "muscle", 0.12),
        (body & (streaks > 1.8), "fat", 0.06),
        (body & (body_r > 1.0 - fat_t / min(bax, bay)), "fat", 0.06),
        (_ellipse(xx, yy, acx, acy, ar, ar) <= 1.0, "aorta", 0.03),
        (_ellipse(xx, yy, scx, scy, sr, sr * 0.85) <= 1.0, "cortex", 0.05),
        (_ellipse(xx, yy, scx, scy, sr * 0.75, sr * 0.64) <= 1.0, "marrow", 0.08),
    ):
        img[mask] = it[tissue]
        amp[mask] = gain
    inner = _ellipse(xx, yy, bcx, bcy, bax - fat_t, bay - fat_t) <= 1.0
    lung_r = np.full(xx.shape, np.inf, dtype=np.float32)
    for lcx, lcy, lax, lay, *harm in a.lungs:
        ratio = _ellipse(xx, yy, lcx, lcy, lax, lay) / _Polar(xx, yy, lcx, lcy).harmonics(*harm)
        lung_r = np.minimum(lung_r, np.where(inner, ratio, np.inf))
    return _Torso(img, amp, lung_r)


def _render_slice(
    a: _Anatomy, t: float, xx: np.ndarray, yy: np.ndarray, s: float, torso: _Torso
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Paint one slice at relative depth t (0 base, 1 apex).

    Returns intensity, label, sub-region and texture-gain maps. The heart is rendered only inside a tight
    region of interest around it, which is what keeps the default dataset fast to generate.
    """
    it = a.intensities
    img, amp = torso.img.copy(), torso.amp.copy()
    label = np.zeros(xx.shape, dtype=np.uint8)
    sub = np.zeros(xx.shape, dtype=np.uint8)
    lungs = torso.lung_r <= 1.0 - 0.15 * t
    img[lungs] = it["lung"]
    amp[lungs] = 0.5

    # Geometry of this slice: LV shrinks from base to apex, the RV shrinks faster and fades towards the apex.
    hcx, hcy, drx, dry = a.heart
    cx, cy = hcx + drx * t, hcy + dry * t
    r0, apex_ratio, ecc, rot, c2, p2, c3, p3 = a.lv_shape
    r = r0 * (1.0 - (1.0 - apex_ratio) * t**1.6)
    t0, t_mod, t_phase = a.myo
    thick0 = t0 * (1.0 - 0.25 * t)
    r_epi = r + thick0
    off, depth, width, tilt, shrink = a.rv
    q = 1.0 - shrink * t**1.3
    sa = a.septal_angle
    rv_ax, rv_ay = max(depth * r_epi * q, 1.0), width * r_epi * (0.6 + 0.4 * q)
    rv_cx, rv_cy = cx + off * r_epi * math.cos(sa), cy + off * r_epi * math.sin(sa)
    pf_t, pf_phase = a.peri_fat

    # Region of interest: LV+myocardium disc and RV ellipse bounding boxes, padded for RV wall and fat.
    pad = max(1.8 * s, 1.0) + 1.9 * pf_t + 2.0
    lv_ext = r * max(ecc, 1.0 / ecc) * (1.0 + c2 + c3) + max(thick0 * (1.0 + t_mod), 2.0) + pad
    ex, ey = _ellipse_extent(rv_ax, rv_ay, sa + tilt)
    h, w = xx.shape
    y0 = max(int(math.floor(min(cy - lv_ext, rv_cy - ey - pad))), 0)
    y1 = min(int(math.ceil(max(cy + lv_ext, rv_cy + ey + pad))) + 1, h)
    x0 = max(int(math.floor(min(cx - lv_ext, rv_cx - ex - pad))), 0)
    x1 = min(int(math.ceil(max(cx + lv_ext, rv_cx + ex + pad))) + 1, w)
    roi = (slice(y0, y1), slice(x0, x1))
    xr, yr = xx[roi], yy[roi]
    img_r, amp_r, label_r, sub_r = img[roi], amp[roi], label[roi], sub[roi]  # views: painting writes through

    def paint(mask: np.ndarray, tissue: str, texture: float) -> None:
        img_r[mask] = it[tissue]
        amp_r[mask] = texture

    # LV cavity: ellipse with low-order angular harmonics.
    polar = _Polar(xr, yr, cx, cy)
    boundary = polar.harmonics(c2, p2, c3, p3)
    lv_r = _ellipse(xr, yr, cx, cy, r * ecc, r / ecc, rot)
    lv = lv_r <= boundary

    # Myocardium: Euclidean ring of angle-dependent thickness (>= ~2.7 px) so it always encloses the LV.
    thick = np.maximum(thick0 * (1.0 + t_mod * polar.cos(t_phase)), 2.0)  # >= 2 px even on tiny slices
    myo = ~lv & (_dist_to(lv, max(thick0 * (1.0 + t_mod), 2.0)) <= thick)
    epi = lv | myo

    # RV: wide ellipse on the septal side minus the LV+myocardium, i.e. a crescent hugging the septum,
    # closed by a thin dark free wall (background label).
    rv = (_ellipse(xr, yr, rv_cx, rv_cy, rv_ax, rv_ay, sa + tilt) <= 1.0) & ~epi
    wall_t = max(1.8 * s, 1.0)
    rv_wall = (_dist_to(rv, wall_t) <= wall_t) & ~epi & ~rv

    # Epicardial fat in an angular sector around the whole heart (background label, bright like fat).
    heart = epi | rv | rv_wall
    pf_thick = pf_t * np.clip(1.5 * polar.cos(pf_phase) + 0.4, 0.0, None)
    dist_heart = _dist_to(heart, 1.9 * pf_t)
    paint((dist_heart > 0) & (dist_heart <= pf_thick), "fat", 0.05)
    paint(rv_wall, "rv_wall", 0.04)

    # Myocardium sub-regions: mid-grey ring with a brighter transmural sector.
    bright = myo & (polar.cos(a.bright_sector[0]) >= math.cos(a.bright_sector[1] / 2))
    paint(myo, "myo_dark", 0.04)
    paint(bright, "myo_bright", 0.04)
    label_r[myo] = MYO
    sub_r[bright] = 1

    # LV sub-regions: bright pool; darker papillary muscles (opposite the septum) and endocardial trabeculae.
    lv_dark = np.zeros_like(lv)
    if 0.05 <= t <= 0.9:
        for ang, pos, rad in a.papillary:
            px, py = cx + pos * r * math.cos(sa + ang), cy + pos * r * math.sin(sa + ang)
            lv_dark |= (xr - px) ** 2 + (yr - py) ** 2 <= (rad * r) ** 2
    k1, ph1, k2, ph2 = a.trabeculae
    rim = lv & (lv_r >= boundary * (1.0 - 2.0 * s / r))  # ~2 px endocardial rim
    theta = np.arctan2(polar.s[rim], polar.c[rim])
    rim[rim] = np.cos(k1 * theta + ph1) + 0.6 * np.cos(k2 * theta + ph2) > 0.7
    lv_dark = (lv_dark | rim) & lv
    paint(lv, "lv_bright", 0.03)
    paint(lv_dark, "lv_dark", 0.04)
    label_r[lv] = LV
    sub_r[lv & ~lv_dark] = 1

    # RV sub-regions: bright pool; darker moderator band and a trabeculated rim along part of the free wall.
    band_ang, band_w, rim_start, rim_width = a.rv_dark
    ba = sa + band_ang
    band = (np.abs(-polar.dx * math.sin(ba) + polar.dy * math.cos(ba)) <= band_w / 2) & (polar.cos(ba) > 0)
    sector = polar.cos(sa + rim_start + rim_width / 2) >= math.cos(rim_width / 2)
    rv_rim = (_dist_to(rv_wall, max(2.2 * s, 1.0)) <= max(2.2 * s, 1.0)) & sector
    rv_dark = rv & (band | rv_rim)
    paint(rv, "rv_bright", 0.03)
    paint(rv_dark, "rv_dark", 0.04)
    label_r[rv] = RV
    sub_r[rv & ~rv_dark] = 1
    return img, label, sub, amp


def _bias_field(a: _Anatomy, spec: PhantomSpec) -> np.ndarray:
    """Smooth multiplicative bias (coil sensitivity): exp of a random quadratic in x, y plus a z ramp."""
    d, (h, w) = spec.slices_per_volume, spec.size
    yn = np.linspace(-1.0, 1.0, h, dtype=np.float32)[:, None]
    xn = np.linspace(-1.0, 1.0, w, dtype=np.float32)[None, :]
    b = a.bias
    f_xy = b[0] * xn + b[1] * yn + 0.5 * (b[2] * xn * yn + b[3] * xn**2 + b[4] * yn**2)
    f_z = 0.3 * b[5] * np.linspace(-1.0, 1.0, d, dtype=np.float32)
    lo, hi = float(f_xy.min()), float(f_xy.max())
    peak = max(max(abs(lo + fz), abs(hi + fz)) for fz in f_z.tolist())
    k = spec.bias_strength / max(peak, 1e-6)
    # exp(k (f_xy + f_z)) factorises, so only one 2-D exp is needed.
    return np.exp(k * f_xy)[None] * np.exp(k * f_z)[:, None, None]


def _minmax(x: np.ndarray) -> np.ndarray:
    """Min-max normalise over the whole volume (the dataset's declared normalisation scheme)."""
    lo, hi = float(x.min()), float(x.max())
    return ((x - lo) / max(hi - lo, 1e-8)).astype(np.float32)


def make_phantom_volume(seed: int, spec: PhantomSpec = PhantomSpec()) -> tuple[Volume, np.ndarray]:
    """One deterministic phantom volume (slice 0 = base, last = apex) and its (D, H, W) sub-region map.

    The sub-region map is 1 for the brighter and 0 for the darker intensity sub-region of each foreground
    class (0 on background). Noise is drawn last, so ``noise_std=0`` yields the same anatomy noise-free.
    """
    if seed < 0:
        raise ConfigError(f"Phantom seed must be >= 0, got {seed}.")
    rng = np.random.default_rng(seed)
    a = _sample_anatomy(rng, spec)
    d, (h, w) = spec.slices_per_volume, spec.size
    s = min(h, w) / 128.0
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)

    img = np.empty((d, h, w), dtype=np.float32)
    amp = np.empty((d, h, w), dtype=np.float32)
    label = np.empty((d, h, w), dtype=np.uint8)
    sub = np.empty((d, h, w), dtype=np.uint8)
    streaks = ndimage.gaussian_filter(rng.standard_normal((h, w), dtype=np.float32), (1.2 * s, 3.0 * s))
    torso = _render_torso(a, xx, yy, streaks / max(float(streaks.std()), 1e-6))
    for z in range(d):
        t = z / (d - 1) if d > 1 else 0.5
        img[z], label[z], sub[z], amp[z] = _render_slice(a, t, xx, yy, s, torso)

    # Tissue texture (muscle/fat grain, flow inhomogeneity): smooth multiplicative noise, per-tissue gain.
    # Two 2-D fields mixed with a slice-dependent angle give unit-variance texture that changes along z
    # at a fraction of the cost of a 3-D field.
    fields = ndimage.gaussian_filter(rng.standard_normal((2, h, w), dtype=np.float32), (0, 1.5 * s, 1.5 * s))
    fields /= max(float(fields.std()), 1e-6)
    angles = rng.uniform(0, 2 * math.pi) + np.linspace(0.0, 0.8 * math.pi, d, dtype=np.float32)
    texture = np.cos(angles)[:, None, None] * fields[0] + np.sin(angles)[:, None, None] * fields[1]
    img *= 1.0 + spec.texture_strength * amp * texture
    if spec.psf_sigma > 0:
        img = ndimage.gaussian_filter(img, (0, spec.psf_sigma * s, spec.psf_sigma * s))
    img = np.clip(img, 0.0, None) * _bias_field(a, spec)

    # Rician magnitude noise: |signal + complex Gaussian|, drawn last so noise_std=0 keeps the anatomy.
    n = rng.standard_normal((2, d, h, w), dtype=np.float32) * np.float32(spec.noise_std)
    img = np.sqrt((img + n[0]) ** 2 + n[1] ** 2)

    vol = Volume(
        name=f"phantom_seed{seed}",
        image=_minmax(img),
        label=label,
        spacing=tuple(float(v) for v in spec.spacing),
    )
    return vol, sub


def phantom_volume_seed(seed: int, index: int) -> int:
    """Seed of volume ``index`` of ``make_phantom_data(seed)``; distinct for every (seed, index) pair."""
    if seed < 0 or not 0 <= index < SEED_STRIDE:
        raise ConfigError(f"Phantom seed must be >= 0 and index in [0, {SEED_STRIDE}), got {seed}, {index}.")
    return seed * SEED_STRIDE + index


def make_phantom_data(
    seed: int = 0,
    n_labeled: int = 8,
    n_unlabeled: int = 24,
    n_val: int = 2,
    n_test: int = 2,
    spec: PhantomSpec = PhantomSpec(),
) -> SegmentationData:
    """The embedded default dataset: labelled/unlabelled training slices plus labelled val/test volumes.

    Volumes are numbered globally (labelled, unlabelled, val, test) and each gets its own seed, so the
    splits never share a volume. Training volumes are cut into ``Slice2D`` named
    ``phantom_s{seed}_v{i:03d}_slice_{z}``; unlabelled slices carry ``label=None``.
    """
    counts = {"n_labeled": n_labeled, "n_unlabeled": n_unlabeled, "n_val": n_val, "n_test": n_test}
    for key, value in counts.items():
        if value < 0:
            raise ConfigError(f"make_phantom_data: {key} must be >= 0, got {value}.")
    total = sum(counts.values())
    if total > SEED_STRIDE:
        raise ConfigError(f"make_phantom_data: at most {SEED_STRIDE} volumes, got {total}.")

    def volume(i: int) -> Volume:
        vol, _ = make_phantom_volume(phantom_volume_seed(seed, i), spec)
        return replace(vol, name=f"phantom_s{seed}_v{i:03d}")

    def slices(first: int, count: int, keep_label: bool) -> list[Slice2D]:
        out: list[Slice2D] = []
        for i in range(first, first + count):
            vol = volume(i)
            for z in range(vol.image.shape[0]):
                lab = vol.label[z].copy() if keep_label else None
                out.append(Slice2D(name=f"{vol.name}_slice_{z}", image=vol.image[z].copy(), label=lab))
        return out

    labeled = slices(0, n_labeled, keep_label=True)
    unlabeled = slices(n_labeled, n_unlabeled, keep_label=False)
    start = n_labeled + n_unlabeled
    val = [volume(i) for i in range(start, start + n_val)]
    test = [volume(i) for i in range(start + n_val, start + n_val + n_test)]
    return SegmentationData(
        labeled=labeled,
        unlabeled=unlabeled,
        val_volumes=val,
        test_volumes=test,
        class_names=list(CLASS_NAMES),
        normalization={"scheme": "minmax"},
    )
