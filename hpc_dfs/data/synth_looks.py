"""How the synthetic CT looks: the intensity, texture and scanner model ("look") that
:func:`hpc_dfs.data.synth.render_ct` paints its anatomy with.

The painter in :mod:`hpc_dfs.data.synth` decides *where* each tissue is (a torso, organs, spine,
vessels, and the kidneys and tumour from the label map); a look decides *what each tissue looks like*.
One look object is drawn per case from the case's generator. Three styles (``SynthConfig.style``):
(every look paints a KiTS23 cyst, label 3, as fluid: :meth:`DefaultLook.cyst`; no look draws from the case's
generator for it, so a case without cysts, as every KiTS19 case, renders exactly as before cysts existed)

- ``"default"`` (:class:`DefaultLook`): the project's CT model -- HU tables, four contrast phases,
  a dark perirenal fat rim, histologic-subtype tumour patterns, smooth coarse textures, Gaussian
  blur, gain/offset and white noise. Its output is byte-identical to the renderer before styles
  existed (the draws happen in the same order).
- ``"random"`` (:class:`RandomLook`): domain randomisation after SynthSeg (Billot et al., MedIA
  2023). Every structure gets its own intensity and texture amplitude, drawn per case: half the
  cases jitter each tissue around its CT value, the other half draw every tissue anywhere in
  [-400, 800] HU (contrast orderings that no scanner makes). Textures are picked per structure
  from a bank of smooth fields of different grain; the perirenal fat rim is present or absent,
  of random thickness; then a smooth bias field, random blur, a random lower in-plane resolution,
  and noise of random level. Two constraints keep the task well posed: the tumour differs from
  both kidney tissues, and the kidney cortex from its surroundings, by at least
  :data:`MIN_CONTRAST` HU.
- ``"streak"`` (:class:`StreakLook`): the held-out "unseen renderer" for validation
  (:data:`HELD_OUT_STYLE`); no other style draws from its painter. A different texture model
  (fine speckle instead of smooth fields; lobulated, not blended, mesenteric fat), a different
  contrast model (homogeneous nephrographic kidney without cortex/medulla, a hypo-enhancing
  heterogeneous tumour), no perirenal fat rim, a sharp reconstruction kernel (edge enhancement
  instead of blur), and streak artefacts radiating from the spine plus ring artefacts.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["STYLES", "HELD_OUT_STYLE", "MIN_CONTRAST", "TISSUES", "CYST_HU", "make_look", "DefaultLook", "RandomLook",
           "StreakLook"]

STYLES = ("default", "random", "streak")
HELD_OUT_STYLE = "streak"
MIN_CONTRAST = 60.0  # HU: random style's least tumour/kidney and kidney/surroundings difference

#: HU of tissues before the per-case offset/gain (default look)
HU = {"air": -1000.0, "fat": -100.0, "muscle": 50.0, "soft": 30.0, "liver": 60.0, "spleen": 50.0,
      "cancellous": 250.0, "cortical": 800.0, "gas": -950.0, "fluid": 15.0, "oral_contrast": 280.0}
#: contrast phases: enhancement (HU added) of blood, kidney cortex, medulla, liver, spleen
PHASES = {
    "noncontrast": dict(blood=40, cortex=0, medulla=0, liver=0, spleen=0, tumor=0),
    "corticomedullary": dict(blood=300, cortex=170, medulla=60, liver=25, spleen=60, tumor=1.0),
    "nephrographic": dict(blood=170, cortex=150, medulla=140, liver=50, spleen=60, tumor=0.8),
    "excretory": dict(blood=120, cortex=110, medulla=130, liver=40, spleen=45, tumor=0.6),
}
#: the structures the painter places, with their codes in its tissue map (int8)
TISSUES = {name: i for i, name in enumerate((
    "air", "fat", "muscle", "mesentery", "gas", "fluid", "oral_contrast", "soft", "bowel_wall", "liver", "spleen",
    "psoas", "cortical", "cancellous", "posterior", "canal", "aorta", "ivc", "perirenal", "medulla", "cortex",
    "tumour", "cyst"))}
#: a renal cyst (KiTS23 label 3): water density (HU of its fluid, before the per-case offset and gain), no enhancement
CYST_HU = 10.0
#: tissues next to which perirenal fat may lie (not air, gas, contrast, bone or blood)
_PERIRENAL_OK = np.array([TISSUES[t] for t in ("fat", "muscle", "mesentery", "fluid", "soft", "bowel_wall", "liver",
                                               "spleen", "psoas", "canal")], dtype=np.int8)
#: CT value around which the random style jitters each tissue in its "ct" mode
_CT_CENTRE = {**HU, "mesentery": -40.0, "bowel_wall": 50.0, "psoas": 50.0, "posterior": 560.0, "canal": 20.0,
              "aorta": 200.0, "ivc": 150.0, "perirenal": -95.0, "medulla": 120.0, "cortex": 160.0, "tumour": 90.0,
              "necrosis": 20.0, "mesentery_soft": 35.0}


def make_look(style: str, rng: np.random.Generator, record: Optional[dict], n: int, anat: dict):
    """The look of one case in ``style`` (one of :data:`STYLES`), drawn from ``rng``.

    Args:
        style: "default", "random" or "streak".
        rng: the case's rendering generator (the draws of the default style come first, as before styles).
        record: the case's clinical record (the default look's tumour follows its histologic subtype).
        n: number of slices (texture fields cover the whole volume).
        anat: the anatomy (see ``hpc_dfs.data.synth._anatomy``); the streak look aims its streaks at the spine.

    Raises:
        ValueError: an unknown style.
    """
    if style == "default":
        return DefaultLook(rng, record, n)
    if style == "random":
        return RandomLook(rng, n)
    if style == "streak":
        return StreakLook(rng, n, anat)
    raise ValueError(f"unknown synth style '{style}', expected one of {list(STYLES)}")


# ----------------------------------------------------------------------------- smooth random fields
def coarse_field(rng: np.random.Generator, nz: int, step_z: int = 6, n_xy: int = 12) -> np.ndarray:
    """Random smooth field (values ~N(0,1)) on a coarse grid covering the volume."""
    return rng.standard_normal((max(2, nz // step_z + 2), n_xy, n_xy)).astype(np.float32)


def sample_field(field: np.ndarray, z_pos: np.ndarray, n: int, h: int, w: int) -> np.ndarray:
    """The coarse field linearly interpolated at slices ``z_pos`` of an ``n``-slice volume, size (k, h, w)."""
    nzc = field.shape[0]
    t = z_pos / max(1, n - 1) * (nzc - 1)
    i0 = np.clip(np.floor(t).astype(int), 0, nzc - 2)
    a = (t - i0)[:, None, None].astype(np.float32)
    sl = (1 - a) * field[i0] + a * field[i0 + 1]
    out = F.interpolate(torch.from_numpy(sl)[:, None], size=(h, w), mode="bicubic", align_corners=True)[:, 0]
    return out.numpy()


def _gaussian(hu: np.ndarray, sigma) -> np.ndarray:
    from scipy import ndimage

    return ndimage.gaussian_filter(hu, sigma=sigma, mode="nearest")


def _add_noise(hu: np.ndarray, noise_rng: np.random.Generator, sd: float) -> np.ndarray:
    hu += noise_rng.normal(0, sd, size=hu.shape).astype(np.float32)
    return hu


#: tumour HU by histologic subtype: (base, enhancement), the tumour's mean = base + enhancement * the phase's "tumor"
TUMOUR_HU = {"clear_cell_rcc": (40, 130), "papillary": (35, 35), "chromophobe": (40, 80),
             "clear_cell_papillary_rcc": (40, 90), "oncocytoma": (40, 100), "angiomyolipoma": (20, 40)}
TUMOUR_HU_OTHER = (40, 90)


def tumour_contrast_hu(phase: str, subtype: str) -> float:
    """The default look's mean tumour minus kidney-parenchyma HU (mean of cortex and medulla), before noise.

    Args:
        phase: a key of :data:`PHASES`.
        subtype: a histologic subtype (:data:`TUMOUR_HU`; others get :data:`TUMOUR_HU_OTHER`).
    """
    ph = PHASES[phase]
    base, enhancement = TUMOUR_HU.get(subtype, TUMOUR_HU_OTHER)
    return base + enhancement * ph["tumor"] - (30 + (ph["cortex"] + ph["medulla"]) / 2)


# ----------------------------------------------------------------------------- default
class DefaultLook:
    """The project's CT model (see module doc); every draw in the order of the renderer before styles."""

    name = "default"

    def __init__(self, rng: np.random.Generator, record: Optional[dict], n: int):
        self.phase = str(rng.choice(list(PHASES), p=[0.1, 0.35, 0.4, 0.15]))
        self.ph = ph = PHASES[self.phase]
        self.offset, self.gain = rng.normal(0, 12), rng.uniform(0.92, 1.08)
        self.noise_sd = rng.uniform(6, 28)
        self.blur = (rng.uniform(0.2, 0.6), rng.uniform(0.4, 1.1), rng.uniform(0.4, 1.1))  # voxels (z, y, x)
        self.record = record or {}
        self.subtype = self.record.get("tumor_histologic_subtype") or "clear_cell_rcc"
        self._fields = [coarse_field(rng, n) for _ in range(3)]
        base, enhancement = TUMOUR_HU.get(self.subtype, TUMOUR_HU_OTHER)
        self.t_base = base + enhancement * ph["tumor"] + rng.normal(0, 10)
        self.cortex_mm = rng.uniform(4, 8)
        self.perirenal_mm = rng.uniform(5, 14)
        self.noise_rng = np.random.default_rng(rng.integers(0, 2 ** 63))

    def textures(self, zi: np.ndarray, n: int, h: int, w: int) -> list[np.ndarray]:
        """The texture fields (t0, t1, t2) on slices ``zi``."""
        return [sample_field(f, zi.astype(np.float64), n, h, w) for f in self._fields]

    def tone(self, name: str, m: np.ndarray, tex: list[np.ndarray]):
        """HU of tissue ``name`` at the voxels ``m`` (a scalar or an array of ``m.sum()`` values)."""
        t0, t1, t2 = tex
        ph = self.ph
        if name == "fat":
            return HU["fat"] + 8 * t0[m]
        if name == "mesentery":  # fat/soft tissue texture
            mix = 1 / (1 + np.exp(-1.8 * t1))
            return -90 + 125 * mix[m]
        if name in ("gas", "fluid", "oral_contrast", "soft"):  # bowel content
            return HU[name] + (ph["blood"] * 0.1 if name == "soft" else 0)
        if name == "bowel_wall":
            return 40 + 0.3 * ph["liver"]
        if name == "liver":
            return HU["liver"] + ph["liver"] + 6 * t2[m]
        if name == "spleen":
            return HU["spleen"] + ph["spleen"] + 15 * t2[m] * (self.phase == "corticomedullary")
        if name == "psoas":
            return HU["muscle"] + 5 * t0[m]
        if name == "cancellous":
            return HU["cancellous"] + 40 * t1[m]
        if name == "posterior":
            return HU["cortical"] * 0.7
        if name == "canal":
            return 20
        if name in ("aorta", "ivc"):
            enh = 1.0 if name == "aorta" else (0.8 if self.phase != "corticomedullary" else 0.3)
            return 40 + enh * ph["blood"]
        if name == "perirenal":
            return -95 + 10 * t2[m]
        if name in ("medulla", "cortex"):
            return 30 + ph[name] + 8 * t2[m]
        return HU[name]  # air, muscle, cortical

    def perirenal(self, sub: np.ndarray, tissue: np.ndarray, d_out: np.ndarray) -> np.ndarray:
        """Where the fat rim goes: within ``perirenal_mm`` of the kidney, on soft tissue (by HU)."""
        return (d_out > 0) & (d_out <= self.perirenal_mm) & (sub > -200) & (sub < 150)

    def tumour(self, tex: list[np.ndarray], td: np.ndarray, td_max: float) -> np.ndarray:
        """Tumour HU on the kidney box (``td``: distance inside the tumour, mm), by histologic subtype."""
        tx = tex[2]
        val = self.t_base + 25 * tx
        if self.subtype == "clear_cell_rcc" or self.record.get("tumor_necrosis"):
            core = td > max(4.0, 0.55 * td_max)
            val = np.where(core, 20 + 8 * tx, val)  # necrosis: low, non-enhancing centre
        elif self.subtype == "oncocytoma":
            val = np.where(td > 0.75 * td_max, self.t_base - 50, val)  # central scar
        elif self.subtype == "angiomyolipoma":
            val = np.where(tx > 0.2, -60 + 20 * tx, val)  # macroscopic fat
        return val

    def cyst(self, tex: list[np.ndarray], m: np.ndarray) -> np.ndarray:
        """HU of a simple renal cyst at the voxels ``m``: water (:data:`CYST_HU`), the same in every phase (no
        enhancement), homogeneous up to its wall (a sharp edge: only the scanner's blur softens it)."""
        return CYST_HU + 2 * tex[1][m]

    def scanner(self, hu: np.ndarray, tissue: np.ndarray, tex: list[np.ndarray], Y, X) -> np.ndarray:
        """Partial volume, scanner calibration, noise."""
        hu = _gaussian(hu, self.blur)
        hu = hu * self.gain + self.offset
        return _add_noise(hu, self.noise_rng, self.noise_sd)


# ----------------------------------------------------------------------------- random (SynthSeg style)
_BANK = ((6, 4), (6, 12), (3, 24), (2, 48))  # (slices per control point, control points in-plane): coarse -> fine


class RandomLook:
    """Domain randomisation: random per-structure intensities, textures, fat rim, bias, blur, resolution, noise."""

    name = "random"

    def __init__(self, rng: np.random.Generator, n: int):
        self.mode = "ct" if rng.random() < 0.5 else "any"
        names = [t for t in TISSUES if t not in ("tumour", "cyst")] + ["mesentery_soft", "necrosis"]
        self.mean = {t: self._draw_mean(rng, t) for t in names}
        self.mean["air"] = HU["air"] if rng.random() < 0.5 else self.mean["air"]
        self.has_rim = bool(rng.random() < 0.5)
        if self.has_rim:  # the kidney differs from its rim, or without one from each tissue it touches
            self.mean["perirenal"] = self._apart(rng, "perirenal", [self.mean["cortex"]])
        around = ["perirenal"] if self.has_rim else ["mesentery", "psoas", "liver", "spleen", "muscle"]
        self.mean["cortex"] = self._apart(rng, "cortex", [self.mean[t] for t in around], first=self.mean["cortex"])
        if rng.random() < 0.3:  # no corticomedullary differentiation
            self.mean["medulla"] = self.mean["cortex"]
        self.mean["tumour"] = self._apart(rng, "tumour", [self.mean["cortex"], self.mean["medulla"]])
        self.necrosis = float(rng.uniform(0.4, 0.8)) if rng.random() < 0.4 else None  # core fraction or none
        names += ["tumour"]
        self.amp = {t: float(rng.uniform(0, 35)) for t in names}
        self.which = {t: int(rng.integers(0, len(_BANK))) for t in names}
        self.mix_sharpness = float(rng.uniform(0.5, 4.0))
        self.cortex_mm = float(rng.uniform(3, 9))
        self.perirenal_mm = float(rng.uniform(2, 14))
        self._fields = [coarse_field(rng, n, sz, nxy) for sz, nxy in _BANK] + [coarse_field(rng, n, 8, 4)]
        self.bias = float(rng.uniform(0, 0.25)) if rng.random() < 0.7 else 0.0
        self.blur = (float(rng.uniform(0, 0.75)), *[float(rng.uniform(0, 1.5))] * 2)
        self.lowres = float(rng.uniform(1.2, 3.0)) if rng.random() < 0.5 else 1.0
        self.noise_sd = float(rng.uniform(0, 40))
        self.noise_rng = np.random.default_rng(rng.integers(0, 2 ** 63))

    def _draw_mean(self, rng: np.random.Generator, tissue: str) -> float:
        if self.mode == "ct":
            return float(_CT_CENTRE.get(tissue, 40.0) + rng.uniform(-150, 150))
        return float(rng.uniform(-400, 800))

    def _apart(self, rng: np.random.Generator, tissue: str, others: list[float], first: float | None = None) -> float:
        """A mean for ``tissue`` at least :data:`MIN_CONTRAST` from each of ``others`` (redrawn, else pushed)."""
        v = self._draw_mean(rng, tissue) if first is None else first
        for _ in range(20):
            if all(abs(v - o) >= MIN_CONTRAST for o in others):
                return v
            v = self._draw_mean(rng, tissue)
        while not all(abs(v - o) >= MIN_CONTRAST for o in others):
            v += MIN_CONTRAST
        return v

    def textures(self, zi: np.ndarray, n: int, h: int, w: int) -> list[np.ndarray]:
        """The texture bank (coarse to fine) and the bias field on slices ``zi``."""
        return [sample_field(f, zi.astype(np.float64), n, h, w) for f in self._fields]

    def tone(self, name: str, m: np.ndarray, tex: list[np.ndarray]):
        if name == "mesentery":  # two random tissues blended by a random texture
            t = tex[self.which[name]][m]
            mix = 1 / (1 + np.exp(-self.mix_sharpness * t))
            a, b = self.mean["mesentery"], self.mean["mesentery_soft"]
            return (a + (b - a) * mix).astype(np.float32)
        return (self.mean[name] + self.amp[name] * tex[self.which[name]][m]).astype(np.float32)

    def perirenal(self, sub: np.ndarray, tissue: np.ndarray, d_out: np.ndarray) -> np.ndarray:
        if not self.has_rim:
            return np.zeros(d_out.shape, dtype=bool)
        return (d_out > 0) & (d_out <= self.perirenal_mm) & np.isin(tissue, _PERIRENAL_OK)

    def tumour(self, tex: list[np.ndarray], td: np.ndarray, td_max: float) -> np.ndarray:
        val = self.mean["tumour"] + self.amp["tumour"] * tex[self.which["tumour"]]
        if self.necrosis is not None:
            core = td > max(3.0, self.necrosis * td_max)
            val = np.where(core, self.mean["necrosis"] + self.amp["necrosis"] * tex[self.which["necrosis"]], val)
        return val

    def cyst(self, tex: list[np.ndarray], m: np.ndarray) -> np.ndarray:
        """A cyst is this case's fluid, homogeneous and sharp-edged, pushed (without a draw) to differ from both
        kidney tissues and the tumour by :data:`MIN_CONTRAST`, so that labels 1, 2 and 3 stay separable."""
        v = self.mean["fluid"]
        others = [self.mean["cortex"], self.mean["medulla"], self.mean["tumour"]]
        while not all(abs(v - o) >= MIN_CONTRAST for o in others):
            v += MIN_CONTRAST
        return np.full(int(np.count_nonzero(m)), v, dtype=np.float32)

    def scanner(self, hu: np.ndarray, tissue: np.ndarray, tex: list[np.ndarray], Y, X) -> np.ndarray:
        """Bias field (on attenuation, HU + 1024), blur, lower in-plane resolution, noise."""
        if self.bias:
            hu = (hu + 1024) * np.exp(self.bias * tex[-1]) - 1024
        hu = _gaussian(hu.astype(np.float32), self.blur)
        if self.lowres > 1.0:
            k, h, w = hu.shape
            small = (max(4, int(round(h / self.lowres))), max(4, int(round(w / self.lowres))))
            t = F.interpolate(torch.from_numpy(hu)[:, None], size=small, mode="area")
            hu = F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)[:, 0].numpy()
        return _add_noise(np.ascontiguousarray(hu, dtype=np.float32), self.noise_rng, self.noise_sd)


# ----------------------------------------------------------------------------- streak (held out)
class StreakLook:
    """The held-out renderer: speckle texture, lobulated fat, no fat rim, sharp kernel, streaks and rings."""

    name = "streak"

    _TONES = {"air": -1000.0, "fat": -108.0, "muscle": 48.0, "gas": -900.0, "fluid": 8.0, "oral_contrast": 240.0,
              "soft": 45.0, "bowel_wall": 55.0, "liver": 95.0, "spleen": 102.0, "psoas": 52.0, "cortical": 700.0,
              "cancellous": 210.0, "posterior": 500.0, "canal": 15.0, "aorta": 175.0, "ivc": 150.0,
              "medulla": 150.0, "cortex": 150.0, "tumour": 88.0}

    def __init__(self, rng: np.random.Generator, n: int, anat: dict):
        self.shift = {t: float(rng.normal(0, 8)) for t in self._TONES}
        self.speckle = float(rng.uniform(5, 10))
        self.fat_lobules = float(rng.uniform(-0.8, 0.0))  # threshold on a fine field: more or less mesenteric fat
        self.cortex_mm = 0.0
        self._fields = [coarse_field(rng, n, 2, 48), coarse_field(rng, n, 2, 32)]
        self.noise_sd = float(rng.uniform(8, 18))
        self.sharpen = float(rng.uniform(0.4, 0.9))
        spy, spx, _ = anat["spine"]
        self.centre = (spy, spx)
        k = int(rng.integers(3, 7))
        self.streak_angle = rng.uniform(0, math.pi, size=k)
        self.streak_amp = rng.uniform(40, 100, size=k) * rng.choice([-1, 1], size=k)
        self.streak_width = rng.uniform(0.015, 0.05, size=k)
        self.ring_r = rng.uniform(20, 160, size=int(rng.integers(2, 5)))
        self.ring_amp = float(rng.uniform(15, 30)) * float(rng.choice([-1, 1]))
        self.noise_rng = np.random.default_rng(rng.integers(0, 2 ** 63))

    def textures(self, zi: np.ndarray, n: int, h: int, w: int) -> list[np.ndarray]:
        return [sample_field(f, zi.astype(np.float64), n, h, w) for f in self._fields]

    def tone(self, name: str, m: np.ndarray, tex: list[np.ndarray]):
        s = tex[0][m]
        if name == "mesentery":  # lobules of fat in soft tissue, hard-edged
            return np.where(tex[1][m] > self.fat_lobules, self._TONES["fat"], 35.0).astype(np.float32) + 4 * s
        return (self._TONES[name] + self.shift[name] + self.speckle * s).astype(np.float32)

    def perirenal(self, sub: np.ndarray, tissue: np.ndarray, d_out: np.ndarray) -> np.ndarray:
        return np.zeros(d_out.shape, dtype=bool)  # no fat rim

    def tumour(self, tex: list[np.ndarray], td: np.ndarray, td_max: float) -> np.ndarray:
        base = self._TONES["tumour"] + self.shift["tumour"]
        return np.where(tex[1] > 1.0, 20.0, base + 2 * self.speckle * tex[0])  # hypo-enhancing, small cysts

    def cyst(self, tex: list[np.ndarray], m: np.ndarray) -> np.ndarray:
        """This renderer's fluid tone with its speckle: water, no enhancement, sharp-edged."""
        return (self._TONES["fluid"] + self.shift["fluid"] + self.speckle * tex[0][m]).astype(np.float32)

    def scanner(self, hu: np.ndarray, tissue: np.ndarray, tex: list[np.ndarray], Y, X) -> np.ndarray:
        """Noise, then a sharp kernel (unsharp mask), then streaks from the spine and rings about the isocentre."""
        hu = _add_noise(hu.astype(np.float32), self.noise_rng, self.noise_sd)
        hu = hu + self.sharpen * (hu - _gaussian(hu, (0.0, 1.0, 1.0)))
        dy, dx = Y - self.centre[0], X - self.centre[1]
        r, theta = np.hypot(dy, dx), np.arctan2(dy, dx) % math.pi
        art = np.zeros(np.broadcast_shapes(r.shape), dtype=np.float32)
        for ang, amp, width in zip(self.streak_angle, self.streak_amp, self.streak_width):
            d = np.abs((theta - ang + math.pi / 2) % math.pi - math.pi / 2)
            art += (amp * np.exp(-0.5 * (d / width) ** 2) * np.exp(-r / 150.0)).astype(np.float32)
        rr = np.hypot(Y, X)
        for ring in self.ring_r:
            art += (self.ring_amp * np.exp(-0.5 * ((rr - ring) / 1.5) ** 2)).astype(np.float32)
        body = tissue != TISSUES["air"]
        return hu + np.where(body, art, np.float32(0))
