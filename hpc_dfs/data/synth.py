"""Synthetic KiTS data: CT volumes in the exact KiTS layout, so the real code path runs without the real CT.

    hpc-dfs synth --out DATA --cases 8 --seed 0                       # full phantoms + phantom kits.json
    hpc-dfs synth --out DATA --from-labels ../shared/data/kits19/labels \\
                  --kits-json ../shared/data/kits19/kits.json --cases case_00002,case_00004

Two renderers share one CT painter (:func:`render_ct`):

- **phantoms**: a torso with subcutaneous fat, abdominal wall muscle, mesenteric fat/soft-tissue
  texture, bowel (gas, fluid, oral contrast), liver, spleen, spine (cortical and cancellous bone,
  canal), psoas muscles, aorta and IVC, two bean-shaped kidneys with cortex and medulla, and one
  tumour of varied size on one kidney. The clinical record is drawn first and drives the image:
  the tumour diameter *is* the ``radiographic_size``, BMI sets the fat thickness, and
  ``malignant`` (drawn from size, age and sex by a logistic model) sets the histologic subtype,
  whose enhancement pattern the tumour shows (clear cell: hyper-enhancing with necrosis;
  papillary: hypo-enhancing; oncocytoma: central scar; angiomyolipoma: fat).
- **from labels**: the same painter around a real KiTS19 or KiTS23 label map (kidney 1, tumour 2,
  KiTS23's cyst 3); the body, spine and organs are placed around the real kidneys, the tumour follows
  the case's real histologic subtype, a cyst is fluid (water density, no enhancement, sharp wall),
  and the real clinical record is attached. The segmentation file is copied byte for byte and the
  image gets its exact affine.

The painter places the tissues; how they look comes from a per-case *look*
(:mod:`hpc_dfs.data.synth_looks`), chosen by ``SynthConfig.style`` (``--set style=...``):
``default`` (the CT model described here), ``random`` (domain randomisation, SynthSeg style) or
``streak`` (a held-out renderer for "unseen renderer" validation). The labels, anatomy and record
of a case are the same in every style.

Every case varies: contrast phase (non-contrast, corticomedullary, nephrographic, excretory),
global HU offset and gain, noise level, partial-volume blur, organ sizes and positions. Output
is deterministic for a seed (each case has its own seeded generator, so case 7 does not change
when more cases are asked for). Files are written atomically; a rerun keeps valid existing cases.
Under ``mpirun`` the cases are split across ranks.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from hpc_dfs.data.synth_looks import HU, TISSUES, make_look

__all__ = ["phantom_case", "render_ct", "phantom_record", "render_from_labels"]

_SLAB = 48
_MARGIN = 3

# ----------------------------------------------------------------------------- clinical records
def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def phantom_record(case_id: str, rng: np.random.Generator) -> dict:
    """A KiTS19-schema record whose pre-operative fields carry signal about ``malignant``.

    Larger tumours, older age and male sex raise the probability of malignancy (as in the KiTS
    cohort, where benign masses are mostly small); post-operative fields are filled consistently.
    """
    age = int(np.clip(rng.normal(60, 12), 22, 90))
    male = bool(rng.random() < 0.6)
    bmi = float(np.round(np.clip(rng.normal(29.5, 6.0), 17, 55), 2))
    size = float(np.clip(rng.lognormal(math.log(3.6), 0.55), 1.0, 12.0))
    p_malig = _sigmoid(1.2 + 0.9 * (size - 3.6) + 0.05 * (age - 60) + 0.6 * (male - 0.5))
    malignant = bool(rng.random() < p_malig)
    if malignant:
        subtype = str(rng.choice(["clear_cell_rcc", "papillary", "chromophobe", "clear_cell_papillary_rcc"],
                                 p=[0.68, 0.17, 0.1, 0.05]))
        grade = int(np.clip(round(1.5 + 0.35 * size + rng.normal(0, 0.7)), 1, 4)) if subtype != "chromophobe" else None
        t_stage = "1" if size <= 7 else ("2" if size <= 10 else "3")
    else:
        subtype = str(rng.choice(["oncocytoma", "angiomyolipoma"], p=[0.6, 0.4]))
        grade, t_stage = None, "0"
    smoking = str(rng.choice(["never_smoked", "previous_smoker", "current_smoker"], p=[0.48, 0.36, 0.16]))
    pack = 0 if smoking == "never_smoked" else (str(int(rng.integers(5, 60))) if rng.random() < 0.7 else None)
    quit_age = "not_applicable" if smoking != "previous_smoker" else (str(int(age - rng.integers(1, 30)))
                                                                         if rng.random() < 0.8 else None)
    egfr_v = float(np.round(np.clip(rng.normal(95 - 0.6 * (age - 40), 15), 15, 130)))
    egfr = {"value": ">=90" if egfr_v >= 90 and rng.random() < 0.5 else (egfr_v if rng.random() < 0.75 else None),
            "days_before_nephrectomy": int(rng.integers(1, 90))}
    comorb_p = {"myocardial_infarction": 0.06, "congestive_heart_failure": 0.04, "peripheral_vascular_disease": 0.04,
                "cerebrovascular_disease": 0.05, "dementia": 0.01, "copd": 0.08, "connective_tissue_disease": 0.03,
                "peptic_ulcer_disease": 0.03, "uncomplicated_diabetes_mellitus": 0.18,
                "diabetes_mellitus_with_end_organ_damage": 0.03, "chronic_kidney_disease": 0.08,
                "hemiplegia_from_stroke": 0.01, "leukemia": 0.01, "malignant_lymphoma": 0.01,
                "localized_solid_tumor": 0.15, "metastatic_solid_tumor": 0.03, "mild_liver_disease": 0.03,
                "moderate_to_severe_liver_disease": 0.005, "aids": 0.003}
    radical = size > 7 or (size > 4 and rng.random() < 0.3)
    return {
        "case_id": case_id,
        "age_at_nephrectomy": age,
        "gender": "male" if male else "female",
        "body_mass_index": bmi,
        "comorbidities": {k: bool(rng.random() < p * (1 + (age - 60) / 60)) for k, p in comorb_p.items()},
        "smoking_history": smoking,
        "age_when_quit_smoking": quit_age,
        "pack_years": pack,
        "chewing_tobacco_use": "never_or_not_in_last_3mo",
        "alcohol_use": str(rng.choice(["never_or_not_in_last_3mo", "two_or_less_daily", "more_than_two_daily"],
                                      p=[0.45, 0.48, 0.07])),
        "intraoperative_complications": {"blood_transfusion": bool(rng.random() < 0.05),
                                         "injury_to_surrounding_organ": bool(rng.random() < 0.02),
                                         "cardiac_event": bool(rng.random() < 0.01)},
        "hospitalization": int(rng.integers(1, 8)),
        "ischemia_time": None if radical else int(rng.integers(10, 40)),
        "radiographic_size": round(size, 1),
        "pathologic_size": round(max(0.5, size + rng.normal(0, 0.4)), 1),
        "malignant": malignant,
        "pathology_t_stage": t_stage,
        "pathology_n_stage": "0",
        "pathology_m_stage": "0",
        "tumor_histologic_subtype": subtype,
        "tumor_necrosis": bool(malignant and size > 4 and rng.random() < 0.6),
        "tumor_isup_grade": grade,
        "clavien_surgical_complications": str(rng.choice(["0", "1", "2", "3a"], p=[0.8, 0.1, 0.07, 0.03])),
        "er_visit": bool(rng.random() < 0.1),
        "readmission": bool(rng.random() < 0.06),
        "estimated_blood_loss": int(rng.integers(20, 800)),
        "surgery_type": str(rng.choice(["robotic", "open", "laparoscopic"], p=[0.58, 0.29, 0.13])),
        "surgical_procedure": "radical_nephrectomy" if radical else "partial_nephrectomy",
        "surgical_approach": str(rng.choice(["Transperitoneal", "Retroperitoneal"], p=[0.8, 0.2])),
        "operative_time": int(rng.integers(90, 400)),
        "cytoreductive": False,
        "positive_resection_margins": bool(rng.random() < 0.04),
        "last_preop_egfr": egfr,
        "first_postop_egfr": {"value": float(np.round(egfr_v * rng.uniform(0.7, 1.0))),
                              "days_before_nephrectomy": int(rng.integers(1, 60))},
        "last_postop_egfr": {"value": float(np.round(egfr_v * rng.uniform(0.7, 1.0))),
                             "days_before_nephrectomy": int(rng.integers(60, 1500))},
        "vital_status": "censored" if rng.random() < 0.9 else "deceased",
        "vital_days_after_surgery": int(rng.integers(30, 2000)),
    }


# ----------------------------------------------------------------------------- shapes
def _ellipsoid(Z, Y, X, c, r) -> np.ndarray:
    """Mask of an axis-aligned ellipsoid on a broadcast grid (Z (k,1,1), Y (1,H,1), X (1,1,W))."""
    return ((Z - c[0]) / r[0]) ** 2 + ((Y - c[1]) / r[1]) ** 2 + ((X - c[2]) / r[2]) ** 2 <= 1.0


def _ellipse(Y, X, c, r) -> np.ndarray:
    return ((Y - c[0]) / r[0]) ** 2 + ((X - c[1]) / r[1]) ** 2 <= 1.0


def _anatomy(rng: np.random.Generator, fov_y: float, fov_x: float, z_extent: float, bmi: float,
             kidney_centres: Optional[list] = None, kidney_box: Optional[tuple] = None) -> dict:
    """Random body and organ placement in mm (origin: FOV centre in-plane, top slice in z)."""
    fat = float(np.clip(8 + 1.6 * (bmi - 22) + rng.normal(0, 4), 4, 60))
    ax = fov_x * rng.uniform(0.40, 0.46)
    ay = min(fov_y * rng.uniform(0.30, 0.38), ax * rng.uniform(0.62, 0.8))
    wall = rng.uniform(7, 14)
    cy_body = rng.uniform(-0.03, 0.03) * fov_y
    if kidney_box is not None:  # make sure the real kidneys lie inside the cavity
        (y0, y1), (x0, x1) = kidney_box
        need_y = max(abs(y0 - cy_body), abs(y1 - cy_body)) + fat + wall + 15
        need_x = max(abs(x0), abs(x1)) + fat + wall + 15
        scale = max(1.0, max(need_y / ay, need_x / ax) * 0.85)
        ay, ax = min(ay * scale, 0.49 * fov_y), min(ax * scale, 0.49 * fov_x)
    if kidney_centres:
        kx = float(np.mean([k[2] for k in kidney_centres]))
        spine_y = max(k[1] for k in kidney_centres) + rng.uniform(0, 12)
        kz = float(np.mean([k[0] for k in kidney_centres]))
    else:
        kx, spine_y, kz = 0.0, cy_body + ay * rng.uniform(0.45, 0.55), z_extent * rng.uniform(0.45, 0.6)
    spine_r = rng.uniform(15, 21)
    return {
        "body": (cy_body, ay, ax), "fat": fat, "wall": wall, "z_extent": z_extent,
        "spine": (spine_y, kx, spine_r), "kidney_z": kz,
        "aorta": (spine_y - spine_r - rng.uniform(6, 14), kx + rng.uniform(8, 20), rng.uniform(8, 13)),
        "ivc": (spine_y - spine_r - rng.uniform(4, 12), kx - rng.uniform(18, 30), rng.uniform(8, 12)),
        "psoas": rng.uniform(0.5, 1.0),
        "liver": ((kz - rng.uniform(40, 80)), cy_body - rng.uniform(0, 20), kx - ax * rng.uniform(0.35, 0.5),
                  rng.uniform(70, 110), ay * rng.uniform(0.6, 0.8), ax * rng.uniform(0.35, 0.5)),
        "spleen": ((kz - rng.uniform(40, 70)), spine_y - rng.uniform(10, 30), kx + ax * rng.uniform(0.45, 0.6),
                   rng.uniform(35, 55), rng.uniform(25, 40), rng.uniform(20, 30)),
        "bowel": [((rng.uniform(0, z_extent)), cy_body - ay * rng.uniform(0.0, 0.6), rng.uniform(-0.6, 0.6) * ax,
                   rng.uniform(12, 35), rng.uniform(8, 20), rng.uniform(8, 25),
                   str(rng.choice(["gas", "fluid", "oral_contrast", "soft"], p=[0.35, 0.3, 0.2, 0.15])))
                  for _ in range(int(rng.integers(6, 16)))],
    }


def phantom_case(case_num: int, cfg, seed: int, render: bool = True):
    """(CT int16, labels uint8, affine, record) of phantom ``case_num``; axes (slices, rows, cols), codes I,P,L.

    With ``render=False`` only the record is made (same random draws, no arrays): ``(None, None, None, record)``.
    The look is ``cfg.style`` (default "default"); the labels, anatomy and record do not depend on it.
    """
    from hpc_dfs.data.kits_io import kits_affine

    case_id = f"case_{case_num:05d}"
    rng = np.random.default_rng([seed, case_num])
    record = phantom_record(case_id, rng)
    n = int(rng.integers(cfg.min_slices, cfg.max_slices + 1))
    size = int(cfg.size)
    sz = float(rng.choice([2.5, 3.0, 4.0, 5.0]))
    z_extent = n * sz
    fov = rng.uniform(320, 440)
    sy = sx = round(fov / size, 4)
    record["voxel_spacing"] = {"x_spacing": sx, "y_spacing": sy, "z_spacing": sz}
    anat = _anatomy(rng, size * sy, size * sx, z_extent, record["body_mass_index"])
    # kidneys: bean-shaped ellipsoids posterior-lateral to the spine, right one a little lower
    Z = (np.arange(n) * sz)[:, None, None]
    Y = ((np.arange(size) - size / 2 + 0.5) * sy)[None, :, None]
    X = ((np.arange(size) - size / 2 + 0.5) * sx)[None, None, :]
    spine_y, spine_x, _ = anat["spine"]
    lab = np.zeros((n, size, size), dtype=np.uint8) if render else None
    kidneys = []
    kz_semi = min(rng.uniform(45, 60), 0.42 * z_extent)
    for side in (-1, 1):  # -1: patient's right (low column index), +1: left
        c = (anat["kidney_z"] + (12 if side < 0 else 0) * rng.uniform(0.3, 1.0),
             spine_y - rng.uniform(5, 15), spine_x + side * rng.uniform(55, 75))
        r = (kz_semi, rng.uniform(24, 32), rng.uniform(22, 30))
        if render:
            k = _ellipsoid(Z, Y, X, c, r)
            hilum = _ellipsoid(Z, Y, X, (c[0], c[1] - 0.2 * r[1], c[2] - side * 0.95 * r[2]),
                               (0.35 * r[0], 0.45 * r[1], 0.5 * r[2]))
            lab[k & ~hilum] = 1
        kidneys.append((c, r))
    # tumour on one kidney: its diameter is the record's radiographic size
    (c, r) = kidneys[int(rng.integers(0, 2))]
    rad = min(record["radiographic_size"] * 10 / 2, 0.45 * z_extent, 0.12 * size * sx)
    record["radiographic_size"] = round(2 * rad / 10, 1)
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    depth = rng.uniform(0.35, 0.9)  # 0: centred on the kidney surface; >0 pushed inside (endophytic)
    centre = [c[i] + direction[i] * r[i] * (1 - depth * min(1.0, rad / r[i])) for i in range(3)]
    centre[0] = float(np.clip(centre[0], rad * 0.5, z_extent - rad * 0.5))
    if not render:
        return None, None, None, record
    lab[_ellipsoid(Z, Y, X, centre, (rad, rad, rad))] = 2
    affine = kits_affine((sz, sy, sx))
    style = getattr(cfg, "style", "default")
    ct = render_ct(lab, (sz, sy, sx), anat, record, np.random.default_rng([seed, case_num, 1]), style=style)
    return ct, lab, affine, record


# ----------------------------------------------------------------------------- the CT painter
@dataclass
class _Kidneys:
    """Distance maps on the kidney bounding box (padded by the widest fat rim), in mm."""

    box: tuple            # slices (z, y, x) of the box in the volume
    inside: np.ndarray    # distance inside the kidney (label > 0) to its surface
    outside: np.ndarray   # distance outside the kidney to it
    tumour: Optional[np.ndarray]  # distance inside the tumour (label 2) to its surface; None without tumour


def _kidney_layers(label: np.ndarray, spacing, fat_mm: float = 12.0) -> Optional[_Kidneys]:
    """Distances inside/outside the kidney and inside the tumour on the kidney box; None without kidney."""
    from scipy import ndimage

    parenchyma = label > 0
    if not parenchyma.any():
        return None
    zz, yy, xx = (np.flatnonzero(parenchyma.any(axis=axes)) for axes in ((1, 2), (0, 2), (0, 1)))
    pad = [int(math.ceil(fat_mm / s)) + 1 for s in spacing]
    box = tuple(slice(max(0, a[0] - p), min(dim, a[-1] + p + 1)) for a, p, dim in zip((zz, yy, xx), pad, label.shape))
    m = parenchyma[box]
    inside = ndimage.distance_transform_edt(m, sampling=spacing).astype(np.float32)
    outside = ndimage.distance_transform_edt(~m, sampling=spacing).astype(np.float32)
    tumour = None
    if (label == 2).any():
        tumour = ndimage.distance_transform_edt(label[box] == 2, sampling=spacing).astype(np.float32)
    return _Kidneys(box, inside, outside, tumour)


@dataclass
class _Slab:
    """One slab of slices ``[a, b)`` being painted: HU, tissue codes, coordinates (mm) and textures."""

    a: int
    b: int
    hu: np.ndarray        # float32 (k, h, w)
    tissue: np.ndarray    # int8 (k, h, w), codes of hpc_dfs.data.synth_looks.TISSUES
    Z: np.ndarray         # (k, 1, 1)
    Y: np.ndarray         # (1, h, 1)
    X: np.ndarray         # (1, 1, w)
    tex: list             # the look's texture fields on the slab, each (k, h, w)

    def put(self, look, name: str, m: np.ndarray, tex: Optional[list] = None) -> None:
        """Paint tissue ``name`` at the voxels ``m`` with the look's tone."""
        self.hu[m] = look.tone(name, m, self.tex if tex is None else tex)
        self.tissue[m] = TISSUES[name]


def _paint_torso(s: _Slab, anat: dict, look) -> np.ndarray:
    """Subcutaneous fat, abdominal wall, mesentery and bowel; returns the abdominal cavity mask."""
    cy, ay, ax = anat["body"]
    fat, wall = anat["fat"], anat["wall"]
    shape = s.hu.shape
    wob = 1 + 0.03 * np.sin(s.Z / 40.0)  # the torso changes a little along z
    s.put(look, "fat", np.broadcast_to(_ellipse(s.Y, s.X, (cy, 0), (ay * wob, ax * wob)), shape))
    s.put(look, "muscle", np.broadcast_to(_ellipse(s.Y, s.X, (cy, 0), (ay * wob - fat, ax * wob - fat)), shape))
    cav = np.broadcast_to(_ellipse(s.Y, s.X, (cy, 0), (ay * wob - fat - wall, ax * wob - fat - wall)), shape)
    s.put(look, "mesentery", cav)
    for (bz, by, bx, rz, ry, rx, kind) in anat["bowel"]:
        m = _ellipsoid(s.Z, s.Y, s.X, (bz, by, bx), (rz, ry, rx)) & cav
        s.put(look, kind, m)
        s.put(look, "bowel_wall", _ellipsoid(s.Z, s.Y, s.X, (bz, by, bx), (rz + 2, ry + 2, rx + 2)) & cav & ~m)
    return cav


def _paint_organs(s: _Slab, anat: dict, look, cav: np.ndarray) -> None:
    """Liver, spleen, psoas muscles, vertebra (cortical, cancellous, posterior elements, canal), aorta, IVC."""
    shape = s.hu.shape
    lz, ly, lx, lrz, lry, lrx = anat["liver"]
    s.put(look, "liver", _ellipsoid(s.Z, s.Y, s.X, (lz, ly, lx), (lrz, lry, lrx)) & cav)
    szc, syc, sxc, srz, sry, srx = anat["spleen"]
    s.put(look, "spleen", _ellipsoid(s.Z, s.Y, s.X, (szc, syc, sxc), (srz, sry, srx)) & cav)
    spy, spx, spr = anat["spine"]
    for side in (-1, 1):  # psoas grows towards the pelvis
        pr = (spr * 0.6 + anat["psoas"] * s.Z / 6.0).clip(max=2.2 * spr)
        m = ((s.Y - spy) / (0.9 * pr)) ** 2 + ((s.X - spx - side * (spr + pr * 0.8)) / pr) ** 2 <= 1
        s.put(look, "psoas", np.broadcast_to(m, shape))
    s.put(look, "cortical", np.broadcast_to(_ellipse(s.Y, s.X, (spy, spx), (spr, spr * 1.1)), shape))
    s.put(look, "cancellous", np.broadcast_to(_ellipse(s.Y, s.X, (spy, spx), (spr - 2.5, spr * 1.1 - 2.5)), shape))
    canal = np.broadcast_to(_ellipse(s.Y, s.X, (spy + spr + 9, spx), (7, 8)), shape)
    post = np.broadcast_to(_ellipse(s.Y, s.X, (spy + spr + 10, spx), (13, 16)), shape)
    s.put(look, "posterior", post & ~canal)
    s.put(look, "canal", canal)
    for name in ("aorta", "ivc"):
        vy, vx, vr = anat[name][:3]
        s.put(look, name, np.broadcast_to(_ellipse(s.Y, s.X, (vy, vx), (vr, vr)), shape))


def _paint_kidneys(s: _Slab, label: np.ndarray, kid: Optional[_Kidneys], look) -> None:
    """Perirenal fat, kidney medulla and cortex (by depth), the tumour and any cyst, from the label map."""
    if kid is None:
        return
    box = kid.box
    bz0, bz1 = max(s.a, box[0].start), min(s.b, box[0].stop)
    if bz0 >= bz1:
        return
    sl_out = (slice(bz0 - s.a, bz1 - s.a), box[1], box[2])
    sl_box = slice(bz0 - box[0].start, bz1 - box[0].start)
    lab = label[bz0:bz1, box[1], box[2]]
    sub, tis = s.hu[sl_out], s.tissue[sl_out]  # views: painting them paints the slab
    sub_slab = _Slab(bz0, bz1, sub, tis, s.Z, s.Y, s.X, [t[sl_out] for t in s.tex])
    d_in, d_out = kid.inside[sl_box], kid.outside[sl_box]
    peri = look.perirenal(sub, tis, d_out)
    if peri.any():
        sub_slab.put(look, "perirenal", peri)
    kidney = lab == 1
    sub_slab.put(look, "medulla", kidney)
    sub_slab.put(look, "cortex", kidney & (d_in <= look.cortex_mm))
    tum = lab == 2
    if tum.any():
        val = look.tumour(sub_slab.tex, kid.tumour[sl_box], float(kid.tumour.max()))
        sub[tum] = val[tum]
        tis[tum] = TISSUES["tumour"]
    cyst = lab == 3  # KiTS23 only: fluid, painted last (a cyst is never kidney or tumour tissue)
    if cyst.any():
        sub[cyst] = look.cyst(sub_slab.tex, cyst)
        tis[cyst] = TISSUES["cyst"]


def render_ct(label: np.ndarray, spacing, anat: dict, record: Optional[dict], rng: np.random.Generator,
              style: str = "default") -> np.ndarray:
    """Paint CT (int16 HU) around a class map (1 kidney, 2 tumour, 3 cyst) in KiTS orientation (slices, rows, cols).

    The body and organs come from ``anat`` (see :func:`_anatomy`); kidney cortex/medulla come from
    the distance to the kidney surface; how each tissue looks comes from the ``style``'s look
    (:mod:`hpc_dfs.data.synth_looks`; the default look's tumour follows ``record``'s histologic subtype).
    Rendering runs in slabs of slices with a margin, so memory stays bounded on 600-slice volumes.

    Args:
        label: class map (slices, rows, cols), uint8.
        spacing: (z, y, x) mm.
        anat: body and organ placement from :func:`_anatomy`.
        record: the clinical record, or None.
        rng: the case's rendering generator; the output is a function of its state.
        style: one of :data:`hpc_dfs.data.synth_looks.STYLES`.

    Raises:
        ValueError: an unknown style.
    """
    n, h, w = label.shape
    sz, sy, sx = spacing
    look = make_look(style, rng, record, n, anat)
    kid = _kidney_layers(label, (sz, sy, sx))
    Y = ((np.arange(h) - h / 2 + 0.5) * sy)[None, :, None]
    X = ((np.arange(w) - w / 2 + 0.5) * sx)[None, None, :]
    out = np.empty((n, h, w), dtype=np.int16)
    for z0 in range(0, n, _SLAB):
        a, b = max(0, z0 - _MARGIN), min(n, z0 + _SLAB + _MARGIN)
        zi = np.arange(a, b)
        hu = np.full((b - a, h, w), HU["air"], dtype=np.float32)
        s = _Slab(a, b, hu, np.zeros(hu.shape, np.int8), (zi * sz)[:, None, None].astype(np.float64), Y, X,
                  look.textures(zi, n, h, w))
        cav = _paint_torso(s, anat, look)
        _paint_organs(s, anat, look, cav)
        _paint_kidneys(s, label, kid, look)
        hu = look.scanner(s.hu, s.tissue, s.tex, Y, X)
        keep = slice(z0 - a, z0 - a + min(_SLAB, n - z0))
        out[z0:z0 + _SLAB] = np.clip(np.rint(hu[keep]), -1024, 3071).astype(np.int16)
    return out


def render_from_labels(label_path: Path, record: Optional[dict], seed: int, style: str = "default"
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(CT int16, raw labels, affine) around a real KiTS label map (any orientation; painted in I,P,L).

    Args:
        label_path: a ``segmentation.nii.gz``; its parent folder's name is the case id.
        record: the case's clinical record, or None.
        seed: the run's seed (with the case id, it seeds the case's generator).
        style: the look, one of :data:`hpc_dfs.data.synth_looks.STYLES` (the anatomy does not depend on it).

    Raises:
        ValueError: an unknown style.
    """
    import nibabel as nib
    from hpc_dfs.data.geometry import canonical_transform, voxel_spacing

    case_id = label_path.parent.name
    img = nib.load(str(label_path))
    raw = np.asanyarray(img.dataobj)
    ornt = canonical_transform(img.affine)
    lab = nib.orientations.apply_orientation(raw, ornt).astype(np.uint8)
    sp_native = voxel_spacing(img.affine)
    spacing = [0.0, 0.0, 0.0]
    for i, (axis, _) in enumerate(ornt):
        spacing[int(axis)] = float(sp_native[i])
    n, h, w = lab.shape
    sz, sy, sx = spacing
    rng = np.random.default_rng([seed, zlib.crc32(case_id.encode())])
    # kidney centres (mm) from a coarse grid, to put the spine and organs around the real kidneys
    step = max(1, h // 128)
    coarse = lab[:, ::step, ::step] > 0
    zz, yy, xx = np.nonzero(coarse)
    centres, box = [], None
    if zz.size:
        Zm, Ym, Xm = zz * sz, (yy * step - h / 2 + 0.5) * sy, (xx * step - w / 2 + 0.5) * sx
        for side in (Xm < np.median(Xm), Xm >= np.median(Xm)) if np.ptp(Xm) > 80 else (np.ones_like(Xm, bool),):
            centres.append((float(Zm[side].mean()), float(Ym[side].mean()), float(Xm[side].mean())))
        box = ((float(Ym.min()), float(Ym.max())), (float(Xm.min()), float(Xm.max())))
    bmi = float((record or {}).get("body_mass_index") or (record or {}).get("bmi") or 28.0)
    anat = _anatomy(rng, h * sy, w * sx, n * sz, bmi, kidney_centres=centres or None, kidney_box=box)
    ct_can = render_ct(lab, (sz, sy, sx), anat, record, rng, style=style)
    inv = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(("I", "P", "L")),
                                          nib.orientations.io_orientation(img.affine))
    ct = np.ascontiguousarray(nib.orientations.apply_orientation(ct_can, inv))
    return ct, raw, img.affine


def check_out_folder(out: Path, case_ids: list[str]) -> None:
    """Refuse an ``--out`` that holds a data set of its own: synth adds to (or completes) only its own cases.

    A rerun with the same settings keeps its valid cases; but a folder with a case, or a ``kits.json`` record,
    that this run would not write is someone else's data: writing there would mix phantoms into it and
    replace its ``kits.json`` with records that do not belong to its images.

    Args:
        out: the ``--out`` folder (may not exist yet).
        case_ids: the cases this run writes.

    Raises:
        ConfigError: the folder holds other cases or records; the message names the folder and one of them.
    """
    import json

    from hpc_dfs.config import ConfigError
    from hpc_dfs.contracts.kits import CASE_RE, CLINICAL_NAME

    out, wanted = Path(out), set(case_ids)
    if not out.is_dir():
        return
    others = sorted(p.name for p in out.iterdir() if p.is_dir() and CASE_RE.match(p.name) and p.name not in wanted)
    try:
        listed = [str(r.get("case_id")) for r in json.loads((out / CLINICAL_NAME).read_text()) if isinstance(r, dict)]
    except (OSError, ValueError, TypeError, AttributeError):
        listed = [] if not (out / CLINICAL_NAME).exists() else [f"(an unreadable {CLINICAL_NAME})"]
    others += sorted(c for c in listed if c not in wanted and c not in others)
    if others:
        raise ConfigError(f"--out {out} already holds a data set ({len(others)} case(s) or record(s) this run "
                          f"would not write, e.g. {others[0]}): synth writes into a new folder, or reruns into "
                          "its own with the same settings; choose another --out")
