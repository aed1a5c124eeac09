"""Chest anatomy of the phantoms: the tissue codes and the drawing of one chest into a tissue map.

:class:`_ChestBuilder` draws a patient from a random generator and paints one :class:`Tissue` code per
voxel: body with subcutaneous fat and muscle, ribs and costal cartilage, sternum, spine, two lungs with
branching vessels and bronchi joined to the hila, trachea and main bronchi, heart, aorta, venae cavae and
pulmonary arteries, oesophagus, diaphragm, liver and upper abdomen, and the table under the patient. The
tumours are painted into that map afterwards (:mod:`cmedl.phantom.tumours`); nothing here depends on the
modality.

Grid: at a 512 matrix the in-plane spacing is 0.6-1.0 mm, chosen so that the 307-512 mm field of view
fits the drawn patient, and the slice thickness is drawn among 2-5 mm. A smaller ``size`` keeps the field
of view and scales the in-plane spacing up by 512/size, so small phantoms are coarser than real scans.
Arrays are SimpleITK order ``(z, y, x)``; physical coordinates are LPS millimetres (x to the patient's
left, y posterior, z superior), identity direction, field of view centred on x = y = 0, negative z origin.
"""

from __future__ import annotations

import math
from enum import IntEnum

import numpy as np

REFERENCE_MATRIX = 512
IN_PLANE_SPACING_MM = (0.6, 1.0)  # drawn range at the reference matrix
SLICE_THICKNESSES_MM = (2.0, 2.5, 3.0, 4.0, 5.0)
MAX_SLICES = 200


class Tissue(IntEnum):
    """Tissue codes of a phantom's tissue map (``PhantomCase.tissues``)."""

    AIR = 0
    FAT = 1
    MUSCLE = 2
    CORTICAL_BONE = 3
    MARROW = 4
    CARTILAGE = 5
    LUNG = 6
    LUNG_VESSEL = 7
    AIRWAY = 8
    AIRWAY_WALL = 9
    MYOCARDIUM = 10
    BLOOD = 11  # heart chambers and great vessels
    MEDIASTINUM = 12
    LIVER = 13
    ABDOMEN = 14
    SPINAL_CANAL = 15
    TABLE = 16
    TUMOUR = 17
    DIAPHRAGM = 18


def _lut(tissues: tuple[Tissue, ...] | list[Tissue]) -> np.ndarray:
    """A boolean lookup table over tissue codes, for fast ``lut[tissue_map]`` membership masks."""
    table = np.zeros(256, dtype=bool)
    table[[int(t) for t in tissues]] = True
    return table


_HARD_OR_OUTSIDE = (Tissue.AIR, Tissue.TABLE, Tissue.CORTICAL_BONE, Tissue.MARROW, Tissue.SPINAL_CANAL)
_SOFT_TISSUE_OR_LUNG = _lut([t for t in Tissue if t not in (*_HARD_OR_OUTSIDE, Tissue.CARTILAGE)])
_LUNG_ONLY = _lut([Tissue.LUNG])


def _angle_from(theta: np.ndarray, direction: float) -> np.ndarray:
    """Absolute angular distance (radians, 0..pi) between ``theta`` and ``direction``."""
    return np.abs((theta - direction + np.pi) % (2 * np.pi) - np.pi).astype(np.float32)


class _ChestBuilder:
    """Draws one chest anatomy and paints it into a tissue map.

    The tumours are painted into the same map afterwards (:class:`cmedl.phantom.tumours._TumourPainter`),
    drawing on the same ``rng`` after the anatomy. All lengths are physical millimetres; ``k`` scales the
    patient so a small field of view holds a small patient instead of a clipped one.
    """

    def __init__(
        self, rng: np.random.Generator, size: int, slices: int | None, spacing: tuple[float, float, float] | None
    ) -> None:
        self.rng = rng
        self.size = size
        # The patient comes first; the field of view is then chosen to fit them, as a technologist would.
        patient_a = float(rng.uniform(140.0, 178.0))
        fov_wanted = 2 * patient_a * float(rng.uniform(1.2, 1.5))
        low, high = (REFERENCE_MATRIX * limit for limit in IN_PLANE_SPACING_MM)
        drawn_xy = min(max(fov_wanted, low), high) / size
        drawn_z = float(rng.choice(SLICE_THICKNESSES_MM))
        sx, sy, sz = (drawn_xy, drawn_xy, drawn_z) if spacing is None else tuple(float(v) for v in spacing)
        self.spacing = (sx, sy, sz)
        fov_x, fov_y = size * sx, size * sy

        # Body cross-section: semi-axes a (left-right) and b (antero-posterior) at mid chest. The limits keep
        # the skin (with all its wobbles, at most 1.1 a0 and 1.15 b0) inside a given field of view.
        self.a0 = min(patient_a, 0.4 * fov_x)
        self.b0 = min(self.a0 * float(rng.uniform(0.64, 0.76)), 0.32 * fov_y)
        self.k = self.a0 / 160.0
        k = self.k
        self.body_wobble = rng.uniform(-0.015, 0.015, size=(2, 4))  # radius harmonics 2..5 (amplitude, phase)
        self.body_wobble[1] = rng.uniform(0, 2 * np.pi, size=4)
        self.a_wave = (float(rng.uniform(0.5, 1.2)), float(rng.uniform(0, 2 * np.pi)))
        self.b_wave = (float(rng.uniform(0.5, 1.2)), float(rng.uniform(0, 2 * np.pi)))

        # Body on a table: centre the body plus table in the field of view.
        self.table_gap = float(rng.uniform(2.0, 8.0))
        self.table_thickness = 8.0 * k
        b_max = 1.15 * self.b0
        self.xc = float(rng.uniform(-8.0, 8.0)) * k
        self.yc = -(self.table_gap + self.table_thickness) / 2 + float(rng.uniform(-4.0, 4.0))
        self.table_top = self.yc + b_max + self.table_gap
        self.has_table = self.table_top + self.table_thickness < fov_y / 2 - 2 * sy

        # Body wall layers.
        self.fat0 = float(rng.uniform(6.0, 22.0)) * k
        self.fat_wave = rng.uniform(-0.3, 0.3, size=3), rng.uniform(0, 2 * np.pi, size=3)
        self.muscle0 = float(rng.uniform(6.0, 10.0)) * k
        self.muscle_back = float(rng.uniform(30.0, 42.0)) * k  # paraspinal muscles
        self.muscle_chest = float(rng.uniform(8.0, 20.0)) * k  # pectorals
        self.rib_thickness = float(rng.uniform(6.0, 9.0)) * k
        self.rib_height = float(rng.uniform(9.0, 13.0)) * k
        self.rib_pitch = float(rng.uniform(22.0, 27.0)) * k
        self.rib_drop = float(rng.uniform(70.0, 100.0)) * k  # anterior ends sit lower than posterior ends
        self.pleura = 1.5 * k

        # Along z: lung base (top of the diaphragm's reference level) and lung height.
        self.lung_height = float(rng.uniform(200.0, 250.0)) * k
        self.recess = float(rng.uniform(20.0, 30.0)) * k  # posterior costophrenic recess below the base
        below = float(rng.uniform(25.0, 45.0))
        above = float(rng.uniform(15.0, 30.0))
        z_start = -float(rng.uniform(150.0, 350.0))
        coverage = below + self.recess + self.lung_height + above
        default_slices = min(int(math.ceil(coverage / sz)) + 1, MAX_SLICES)
        self.nz = int(slices) if slices is not None else default_slices
        self.z_base = z_start + below + self.recess
        z_centre = z_start + coverage / 2
        origin_z = z_centre - (self.nz - 1) * sz / 2
        self.origin = (-(size - 1) * sx / 2, -(size - 1) * sy / 2, origin_z)
        self.xs = (self.origin[0] + sx * np.arange(size)).astype(np.float32)
        self.ys = (self.origin[1] + sy * np.arange(size)).astype(np.float32)
        self.zs = self.origin[2] + sz * np.arange(self.nz)

        # Diaphragm domes (right higher, over the liver) and the liver's extent to the left.
        self.dome_right = float(rng.uniform(25.0, 40.0)) * k
        self.dome_left = self.dome_right - float(rng.uniform(5.0, 15.0)) * k
        self.diaphragm_thickness = 5.0 * k
        self.liver_left_edge = float(rng.uniform(20.0, 50.0)) * k

        # Mediastinum: a central column between the lungs, wider low down around the heart.
        self.xm = self.xc + float(rng.uniform(-5.0, 5.0)) * k
        self.column_half_width = float(rng.uniform(14.0, 20.0)) * k
        self.column_widening = float(rng.uniform(5.0, 15.0)) * k
        self.column_wave = (float(rng.uniform(50.0, 90.0)) * k, float(rng.uniform(0, 2 * np.pi)))

        # Spine: canal, vertebral bodies (with discs), posterior elements; a gentle kyphosis.
        self.canal_radius = float(rng.uniform(7.0, 9.0)) * k
        self.canal_depth = float(rng.uniform(38.0, 46.0)) * k  # from the back's skin + fat
        self.vertebra_radius = float(rng.uniform(15.0, 19.0)) * k
        self.vertebra_pitch = float(rng.uniform(24.0, 28.0)) * k
        self.disc_height = float(rng.uniform(4.0, 6.0)) * k
        self.disc_phase = float(rng.uniform(0, 1))
        self.kyphosis = float(rng.uniform(4.0, 12.0)) * k
        self.sternum_half_width = float(rng.uniform(13.0, 18.0)) * k

        self.tissues = np.zeros((self.nz, size, size), dtype=np.uint8)

    # -- geometry along z --------------------------------------------------------------------------------

    def s_of(self, z: float) -> float:
        """Height as a fraction of the lung height: 0 at the lung base, 1 at the apex."""
        return (z - self.z_base) / self.lung_height

    def z_of(self, s: float) -> float:
        return self.z_base + s * self.lung_height

    def semi_axes(self, z: float) -> tuple[float, float]:
        s = self.s_of(z)
        a = self.a0 * (1 + 0.03 * math.sin(2 * math.pi * self.a_wave[0] * s + self.a_wave[1]))
        b = self.b0 * (1 + 0.03 * math.sin(2 * math.pi * self.b_wave[0] * s + self.b_wave[1]))
        b *= 1 + 0.05 * min(max(-3 * s, 0.0), 1.0)  # the abdomen bulges a little
        return a, b

    def canal_y(self, z: float) -> float:
        s = self.s_of(z)
        _, b = self.semi_axes(z)
        kyphosis = self.kyphosis * (1 - ((s - 0.5) / 0.8) ** 2)
        return self.yc + b - self.fat0 - self.canal_depth + kyphosis

    def vertebra_y(self, z: float) -> float:
        return self.canal_y(z) - (self.canal_radius + 4.0 * self.k + self.vertebra_radius)

    def column_half(self, z: float) -> float:
        s = self.s_of(z)
        return self.column_half_width + self.column_widening * min(max((0.6 - s) / 0.3, 0.0), 1.0)

    # -- indices ---------------------------------------------------------------------------------------

    def index_box(self, low: np.ndarray, high: np.ndarray) -> tuple[slice, slice, slice] | None:
        """Voxel index slices (z, y, x) covering the physical box [low, high] (x, y, z mm), or None if outside."""
        sx, sy, sz = self.spacing
        lo = [(low[0] - self.origin[0]) / sx, (low[1] - self.origin[1]) / sy, (low[2] - self.origin[2]) / sz]
        hi = [(high[0] - self.origin[0]) / sx, (high[1] - self.origin[1]) / sy, (high[2] - self.origin[2]) / sz]
        limits = (self.size, self.size, self.nz)
        spans = []
        for axis in range(3):
            start = max(int(math.floor(lo[axis])), 0)
            stop = min(int(math.ceil(hi[axis])) + 1, limits[axis])
            if stop <= start:
                return None
            spans.append(slice(start, stop))
        return spans[2], spans[1], spans[0]

    def box_coordinates(self, box: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Physical coordinates of a box as broadcastable arrays shaped (z,1,1), (1,y,1), (1,1,x)."""
        z = self.zs[box[0]].astype(np.float32)[:, None, None]
        y = self.ys[box[1]][None, :, None]
        x = self.xs[box[2]][None, None, :]
        return x, y, z

    # -- build ------------------------------------------------------------------------------------------

    def build(self) -> np.ndarray:
        """Paint the anatomy; returns the tissue map ``(z, y, x)`` uint8 (``self.tissues``, without tumours)."""
        self._paint_slices()
        self._paint_heart()
        self._paint_great_vessels()
        self._paint_central_airways()
        self._paint_lung_trees()
        return self.tissues

    def _paint_slices(self) -> None:
        """Body, wall layers, ribs, sternum, spine, lungs, diaphragm and upper abdomen, slice by slice.

        Everything that does not depend on z is computed once on the body's bounding rectangle; ribs and
        sternum are evaluated only on the pixels that can hold them (flat index lists).
        """
        k = self.k
        sx, sy, _ = self.spacing
        reach_x = 1.12 * self.a0 + 2 * sx
        reach_y = 1.2 * self.b0 + 2 * sy
        c0, c1 = np.searchsorted(self.xs, [self.xc - reach_x, self.xc + reach_x])
        r0, r1 = np.searchsorted(self.ys, [self.yc - reach_y, self.yc + reach_y])
        c0, r0 = max(c0, 0), max(r0, 0)
        x2, y2 = np.meshgrid(self.xs[c0:c1] - np.float32(self.xc), self.ys[r0:r1] - np.float32(self.yc))
        radius = np.hypot(x2, y2)
        theta = np.arctan2(y2, x2)
        cos_t = x2 / np.maximum(radius, 1e-3)
        sin_t = y2 / np.maximum(radius, 1e-3)
        wobble = np.ones_like(radius)
        for harmonic, (amplitude, phase) in enumerate(self.body_wobble.T, start=2):
            wobble += amplitude * np.cos(harmonic * theta + phase)
        fat = np.full_like(radius, self.fat0)
        for harmonic, (amplitude, phase) in enumerate(zip(*self.fat_wave), start=1):
            fat *= 1 + amplitude * np.cos(harmonic * theta + phase) / 3
        back = _angle_from(theta, np.pi / 2)  # posterior is +y
        front = _angle_from(theta, -np.pi / 2)
        muscle = self.muscle0 + self.muscle_back * np.exp(-((back / 0.42) ** 2))
        muscle += self.muscle_chest * np.exp(-(((front - 0.75) / 0.35) ** 2))
        rib_inner = fat + muscle
        rib_outer = rib_inner + self.rib_thickness
        cavity_depth = rib_outer + self.pleura
        # body radius along each ray = (a b / ellipse_norm) * wobble; depth = body radius - radius
        cos2, sin2 = cos_t**2, sin_t**2

        def depth_for(a: float, b: float) -> np.ndarray:
            return (a * b) * wobble / np.sqrt(b * b * cos2 + a * a * sin2) - radius

        axes = np.array([self.semi_axes(z) for z in self.zs])
        depth_low = depth_for(axes[:, 0].min(), axes[:, 1].min())
        depth_high = depth_for(axes[:, 0].max(), axes[:, 1].max())

        # Ribs: oblique arcs, anterior ends lower; gaps at the spine and sternum, cartilage at the front.
        ring = np.flatnonzero((depth_high > rib_inner) & (depth_low <= rib_outer + self.pleura))
        ring_inner, ring_outer = rib_inner.ravel()[ring], rib_outer.ravel()[ring]
        ring_front, ring_back = front.ravel()[ring], back.ravel()[ring]
        rib_top = self.z_of(1.0) - 8.0 * k
        ring_phase = (rib_top - self.rib_drop * (1 - sin_t.ravel()[ring]) / 2) / self.rib_pitch
        ring_kind = np.where(ring_front < 0.5, Tissue.CARTILAGE, Tissue.CORTICAL_BONE).astype(np.uint8)
        ring_kind[(ring_back < 0.14) | (ring_front < 0.12)] = 0
        ring_floating_ok = ring_back < 1.5
        ring_core_margin = 1.2 * k

        side_x = x2 - np.float32(self.xm - self.xc)
        abs_side_x = np.abs(side_x)
        sternum_px = np.flatnonzero(((abs_side_x < self.sternum_half_width) & (front < 0.5)).ravel())
        sternum_fat = fat.ravel()[sternum_px]
        sternum_outer = rib_outer.ravel()[sternum_px]
        sternum_core_x = abs_side_x.ravel()[sternum_px] < self.sternum_half_width - 1.5 * k

        # Lung-base domes: the right one higher (over the liver); lowest in the posterior recesses.
        dome = 1 - ((abs_side_x - 0.4 * self.a0) / (0.42 * self.a0)) ** 2
        dome -= ((y2 + 0.05 * self.b0) / (0.75 * self.b0)) ** 2
        dome_height = np.where(side_x < 0, self.dome_right, self.dome_left).astype(np.float32)
        diaphragm_z = self.z_base + np.maximum(dome_height * dome, -self.recess)
        # Above 55% of the lung height each lung narrows towards a rounded apex.
        apex_q = ((abs_side_x - 0.42 * self.a0) / (0.45 * self.a0)) ** 2
        apex_q += ((y2 - 0.1 * self.b0) / (0.85 * self.b0)) ** 2
        liver_side = side_x < self.liver_left_edge
        # The mediastinal column narrows towards the sternum, where the lungs nearly meet.
        vertebra_front = self.vertebra_y(self.z_of(0.5)) - self.yc
        towards_front = np.clip((vertebra_front - y2) / (vertebra_front + 0.9 * self.b0), 0, 1)
        wave = 1 + 0.12 * np.sin(2 * np.pi * y2 / self.column_wave[0] + self.column_wave[1] + 0.5 * np.sign(side_x))
        column_measure = abs_side_x / ((1 - 0.5 * towards_front**2) * wave)

        out = np.zeros(x2.shape, dtype=np.uint8)  # one slice of the body rectangle, reused
        flat = out.reshape(-1)
        for index, z in enumerate(self.zs):
            s = self.s_of(z)
            depth = depth_for(*self.semi_axes(z))
            out.fill(Tissue.AIR)
            out[depth > 0] = Tissue.FAT
            out[depth > fat] = Tissue.MUSCLE
            cavity = depth > cavity_depth
            above_diaphragm = diaphragm_z < z
            out[cavity & above_diaphragm] = Tissue.MEDIASTINUM
            below = cavity & ~above_diaphragm
            out[below & liver_side] = Tissue.LIVER
            out[below & ~liver_side] = Tissue.ABDOMEN
            lung_base = diaphragm_z < z - self.diaphragm_thickness
            out[cavity & above_diaphragm & ~lung_base] = Tissue.DIAPHRAGM
            column = (column_measure < self.column_half(z)) & (y2 < self.vertebra_y(z) - self.yc)
            lung = cavity & lung_base & ~column
            if s > 0.55:
                in_apex = apex_q < max(1 - ((s - 0.55) / 0.45) ** 2, 0.0)
                out[cavity & ~in_apex & ~column & above_diaphragm] = Tissue.MUSCLE
                lung &= in_apex
            out[lung] = Tissue.LUNG

            ring_depth = depth.ravel()[ring]
            phase = ring_phase - z / self.rib_pitch
            rib_index = np.rint(phase)
            offset = np.abs(phase - rib_index) * self.rib_pitch
            on_rib = (ring_depth > ring_inner) & (ring_depth <= ring_outer) & (offset < self.rib_height / 2)
            on_rib &= (rib_index >= 0) & (rib_index < 12) & (ring_kind > 0) & ((rib_index < 10) | ring_floating_ok)
            core = on_rib & (ring_kind == Tissue.CORTICAL_BONE) & (offset < self.rib_height / 2 - ring_core_margin)
            core &= (ring_depth > ring_inner + ring_core_margin) & (ring_depth < ring_outer - ring_core_margin)
            values = np.where(core, np.uint8(Tissue.MARROW), ring_kind)
            flat[ring[on_rib]] = values[on_rib]

            if 0.35 < s < 0.92:  # sternum: manubrium to xiphoid
                sternum_depth = depth.ravel()[sternum_px]
                bone = (sternum_depth > sternum_fat + 0.4 * self.muscle0) & (sternum_depth < sternum_outer + 2 * k)
                core = bone & sternum_core_x & (sternum_depth > sternum_fat + 0.4 * self.muscle0 + 1.5 * k)
                core &= sternum_depth < sternum_outer + 0.5 * k
                flat[sternum_px[bone]] = Tissue.CORTICAL_BONE
                flat[sternum_px[core]] = Tissue.MARROW
            self._paint_spine_slice(out, x2, y2, z)
            self.tissues[index, r0:r1, c0:c1] = out

        if self.has_table:
            j0, j1 = np.searchsorted(self.ys, [self.table_top, self.table_top + self.table_thickness])
            half_width = min(240.0, 0.45 * self.size * sx)
            i0, i1 = np.searchsorted(self.xs, [self.xc - half_width, self.xc + half_width])
            self.tissues[:, j0:j1, i0:i1] = Tissue.TABLE

    def _paint_spine_slice(self, out: np.ndarray, x2: np.ndarray, y2: np.ndarray, z: float) -> None:
        """Vertebral body (cortex, marrow, discs), canal and posterior elements; keeps the lungs off the spine."""
        k = self.k
        canal_y = self.canal_y(z) - self.yc
        body_y = self.vertebra_y(z) - self.yc
        keepout = self.vertebra_radius + 6 * k
        reach = self.vertebra_radius + self.canal_radius + 40 * k
        rows = np.flatnonzero((y2[:, 0] > body_y - keepout - 2) & (y2[:, 0] < canal_y + reach))
        cols = np.flatnonzero(np.abs(x2[0] - np.float32(self.xm - self.xc)) < reach)
        if rows.size == 0 or cols.size == 0:
            return
        window = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        dx = x2[window] - np.float32(self.xm - self.xc)
        dy_canal = y2[window] - np.float32(canal_y)
        patch = out[window]
        body_r = np.hypot(dx, y2[window] - np.float32(body_y))
        patch[(body_r < keepout) & (patch == Tissue.LUNG)] = Tissue.MEDIASTINUM
        canal_r = np.hypot(dx, dy_canal)
        level = ((z / self.vertebra_pitch + self.disc_phase) % 1.0) * self.vertebra_pitch
        if level < 0.7 * self.vertebra_pitch:  # posterior elements are separate for each vertebra
            lamina = (canal_r < self.canal_radius + 5 * k) & (dy_canal > -2 * k)
            spinous = (np.abs(dx) < 4 * k) & (dy_canal > 0) & (dy_canal < self.canal_radius + 30 * k)
            transverse = (np.abs(dy_canal) < 5 * k) & (np.abs(dx) < self.canal_radius + 26 * k)
            patch[lamina | spinous | transverse] = Tissue.CORTICAL_BONE
        patch[canal_r < self.canal_radius] = Tissue.SPINAL_CANAL
        in_body = body_r < self.vertebra_radius
        if level < self.disc_height:
            patch[in_body] = Tissue.CARTILAGE
        else:
            patch[in_body] = Tissue.CORTICAL_BONE
            patch[body_r < self.vertebra_radius - 1.5 * k] = Tissue.MARROW

    # -- 3D structures --------------------------------------------------------------------------------

    def tube(self, p0, p1, r0: float, r1: float, tissue: Tissue, onto: np.ndarray) -> None:
        """Paint a tapered tube from ``p0`` to ``p1`` (x, y, z mm; radii r0 -> r1 mm) over tissues in ``onto``.

        Long tubes are painted in short pieces: bounding boxes of short pieces hold far fewer voxels.
        """
        p0, p1 = np.asarray(p0, dtype=np.float64), np.asarray(p1, dtype=np.float64)
        floor_radius = 0.45 * min(self.spacing[0], self.spacing[1])
        length = float(np.linalg.norm(p1 - p0))
        pieces = max(1, int(math.ceil(length / max(15.0, 3 * max(r0, r1)))))
        for piece in range(pieces):
            t0, t1 = piece / pieces, (piece + 1) / pieces
            a, b = p0 + (p1 - p0) * t0, p0 + (p1 - p0) * t1
            ra = max(r0 + (r1 - r0) * t0, floor_radius)
            rb = max(r0 + (r1 - r0) * t1, floor_radius)
            self._tube_piece(a, b, ra, rb, tissue, onto)

    def _tube_piece(self, a, b, ra: float, rb: float, tissue: Tissue, onto: np.ndarray) -> None:
        reach = max(ra, rb)
        # Slices are thick: widen the box in z by half a slice so thin oblique tubes still land in a slice.
        pad = np.array([reach, reach, reach + self.spacing[2] / 2])
        box = self.index_box(np.minimum(a, b) - pad, np.maximum(a, b) + pad)
        if box is None:
            return
        x, y, z = self.box_coordinates(box)
        d = (b - a).astype(np.float32)
        squared = float(d @ d) or 1.0
        t = ((x - a[0]) * d[0] + (y - a[1]) * d[1] + (z - a[2]) * d[2]) / squared
        np.clip(t, 0.0, 1.0, out=t)
        distance2 = (x - a[0] - t * d[0]) ** 2 + (y - a[1] - t * d[1]) ** 2 + (z - a[2] - t * d[2]) ** 2
        radius = ra + (rb - ra) * t
        region = self.tissues[box]
        region[(distance2 <= radius * radius) & onto[region]] = tissue

    def ellipsoid(self, centre, axes, angle: float, tissue: Tissue, onto: np.ndarray) -> None:
        """Paint an ellipsoid with semi-axes ``axes`` (mm), rotated by ``angle`` (radians) about z."""
        reach = max(axes[0], axes[1])
        box = self.index_box(np.asarray(centre) - [reach, reach, axes[2]], np.asarray(centre) + [reach, reach, axes[2]])
        if box is None:
            return
        x, y, z = self.box_coordinates(box)
        dx, dy, dz = x - centre[0], y - centre[1], z - centre[2]
        u = dx * math.cos(angle) + dy * math.sin(angle)
        v = -dx * math.sin(angle) + dy * math.cos(angle)
        inside = (u / axes[0]) ** 2 + (v / axes[1]) ** 2 + (dz / axes[2]) ** 2 <= 1
        region = self.tissues[box]
        region[inside & onto[region]] = tissue

    def _paint_heart(self) -> None:
        rng, k = self.rng, self.k
        self.heart_axes = np.array([rng.uniform(52, 64), rng.uniform(40, 48), rng.uniform(42, 52)]) * k
        # The long axis points to the patient's left, forwards and down; the heart rests on the left dome.
        self.heart_angle = -float(rng.uniform(0.45, 0.8))
        self.heart_centre = np.array(
            [
                self.xm + float(rng.uniform(14, 26)) * k,
                self.yc - self.b0 * float(rng.uniform(0.12, 0.22)),
                self.z_base + self.dome_left * 0.5 + 0.65 * self.heart_axes[2],
            ]
        )
        fat = float(rng.uniform(2.0, 5.0)) * k
        wall = float(rng.uniform(8.0, 12.0)) * k
        centre, axes, angle = self.heart_centre, self.heart_axes, self.heart_angle
        # Outwards in: a sleeve that keeps the lungs off, epicardial fat, myocardium, then the chambers.
        self.ellipsoid(centre, axes + fat + 2 * k, angle, Tissue.MEDIASTINUM, _LUNG_ONLY)
        self.ellipsoid(centre, axes + fat, angle, Tissue.FAT, _lut([Tissue.LUNG, Tissue.MEDIASTINUM, Tissue.MUSCLE]))
        self.ellipsoid(centre, axes, angle, Tissue.MYOCARDIUM, _lut([Tissue.LUNG, Tissue.MEDIASTINUM, Tissue.FAT]))
        self.ellipsoid(centre, axes - wall, angle, Tissue.BLOOD, _lut([Tissue.MYOCARDIUM]))

    def _vessel(self, points, radii, tissue: Tissue = Tissue.BLOOD, margin: float = 3.0) -> None:
        """A polyline vessel with a thin sleeve of mediastinal tissue that keeps the lungs off it."""
        margin *= self.k
        for (p0, p1), (r0, r1) in zip(zip(points[:-1], points[1:]), zip(radii[:-1], radii[1:])):
            self.tube(p0, p1, r0 + margin, r1 + margin, Tissue.MEDIASTINUM, _LUNG_ONLY)
        for (p0, p1), (r0, r1) in zip(zip(points[:-1], points[1:]), zip(radii[:-1], radii[1:])):
            self.tube(p0, p1, r0, r1, tissue, _SOFT_TISSUE_OR_LUNG)

    def hilum(self, side: int) -> np.ndarray:
        """Physical point where the main vessels and bronchus of one lung (-1 right, +1 left) enter it."""
        z = self.z_of(self.hilum_s)
        return np.array([self.xm + side * (self.column_half(z) + 8.0 * self.k), self.yc + 0.02 * self.b0, z])

    def _paint_great_vessels(self) -> None:
        rng, k = self.rng, self.k
        top = self.zs[-1] + 10.0
        bottom = self.zs[0] - 10.0
        heart_top = self.heart_centre[2] + 0.6 * self.heart_axes[2]
        self.hilum_s = float(rng.uniform(0.55, 0.6))
        arch_z = self.z_of(float(rng.uniform(0.76, 0.82)))
        vertebra_y = self.vertebra_y(arch_z)

        ascending_r = float(rng.uniform(13.0, 16.0)) * k
        descending_r = float(rng.uniform(10.0, 12.5)) * k
        ascending_xy = np.array([self.xm - float(rng.uniform(2, 10)) * k, self.yc - self.b0 * 0.2])
        descending_xy = np.array(
            [self.xm + self.vertebra_radius * 0.7 + descending_r * 0.9, vertebra_y - self.vertebra_radius * 0.2]
        )
        arch = [np.array([*ascending_xy, self.heart_centre[2]]), np.array([*ascending_xy, arch_z])]
        for t in np.linspace(0.2, 1.0, 5):  # the arch climbs and bends back to the left
            xy = ascending_xy + (descending_xy - ascending_xy) * t
            lift = 12.0 * k * math.sin(math.pi * t)
            arch.append(np.array([*xy, arch_z + lift * (1 - t) + lift * 0.5]))
        arch.append(np.array([*descending_xy, arch_z - 20 * k]))
        arch.append(np.array([*descending_xy, bottom]))
        radii = [ascending_r, ascending_r] + list(np.linspace(ascending_r, descending_r, 5)) + [descending_r] * 2
        self._vessel(arch, radii)

        # Superior vena cava to the right atrium; three arch branches towards the neck.
        svc_r = float(rng.uniform(8.0, 11.0)) * k
        svc_xy = [ascending_xy[0] - ascending_r - svc_r - 4 * k, ascending_xy[1] + 6 * k]
        self._vessel([[*svc_xy, top], [*svc_xy, heart_top - 10 * k]], [svc_r, svc_r])
        for t, dx in zip((0.15, 0.45, 0.75), (-14.0, 0.0, 12.0)):
            xy = ascending_xy + (descending_xy - ascending_xy) * t
            radius = float(rng.uniform(4.5, 7.0)) * k
            self._vessel([[*xy, arch_z + 5 * k], [xy[0] + dx * k, xy[1] - 5 * k, top]], [radius, radius], margin=2.0)

        # Pulmonary trunk from the right ventricle up to its bifurcation, then to each hilum.
        trunk_r = float(rng.uniform(12.0, 15.0)) * k
        trunk_start = np.array([self.xm + 12 * k, self.yc - self.b0 * 0.32, heart_top - 15 * k])
        split = np.array([self.xm + 6 * k, self.yc - self.b0 * 0.08, self.z_of(self.hilum_s + 0.05)])
        self._vessel([trunk_start, split], [trunk_r, trunk_r])
        branch_r = float(rng.uniform(9.0, 11.0)) * k
        left_atrium = self.heart_centre + [0, 0.5 * self.heart_axes[1], 0.3 * self.heart_axes[2]]
        self.vein_roots = {}
        for side in (-1, 1):
            hilum = self.hilum(side)
            self._vessel([split, hilum], [branch_r, branch_r * 0.8])
            self.vein_roots[side] = hilum + [0, 10 * k, -25 * k]
            vein_r = float(rng.uniform(6.0, 8.0)) * k
            self._vessel([self.vein_roots[side], left_atrium], [vein_r, vein_r])

        # Oesophagus, between the trachea and the spine.
        self.trachea_xy = np.array(
            [self.xm + float(rng.uniform(-3, 3)) * k, self.vertebra_y(self.z_of(0.8)) - self.vertebra_radius - 22 * k]
        )
        oesophagus_r = float(rng.uniform(7.0, 9.0)) * k
        oesophagus_xy = [self.xm + 8 * k, self.trachea_xy[1] + 14 * k]
        self._vessel(
            [[*oesophagus_xy, top], [*oesophagus_xy, self.z_base - 20 * k]],
            [oesophagus_r] * 2,
            tissue=Tissue.MEDIASTINUM,
        )

    def _airway(self, p0, p1, r0: float, r1: float, wall: float, onto_wall: np.ndarray) -> None:
        self.tube(p0, p1, r0 + wall, r1 + wall, Tissue.AIRWAY_WALL, onto_wall)
        self.tube(p0, p1, r0, r1, Tissue.AIRWAY, _lut([Tissue.AIRWAY_WALL, Tissue.AIRWAY]))

    def _paint_central_airways(self) -> None:
        rng, k = self.rng, self.k
        top = self.zs[-1] + 10.0
        carina = np.array([*self.trachea_xy, self.z_of(float(rng.uniform(0.64, 0.7)))])
        trachea_r = float(rng.uniform(8.0, 10.5)) * k
        wall = 2.0 * k
        self.tube(
            [*self.trachea_xy, top],
            carina,
            trachea_r + wall + 3 * k,
            trachea_r + wall + 3 * k,
            Tissue.MEDIASTINUM,
            _LUNG_ONLY,
        )
        self._airway([*self.trachea_xy, top], carina, trachea_r, trachea_r, wall, _SOFT_TISSUE_OR_LUNG)
        self.bronchus_start = {}
        for side in (-1, 1):
            hilum = self.hilum(side) + [0, 6 * k, 4 * k]  # bronchi lie behind and above the arteries
            bronchus_r = float(rng.uniform(6.0, 7.5)) * k
            sleeve = bronchus_r + wall + 2 * k
            self.tube(carina, hilum, sleeve, sleeve, Tissue.MEDIASTINUM, _LUNG_ONLY)
            self._airway(carina, hilum, bronchus_r, bronchus_r * 0.85, wall, _SOFT_TISSUE_OR_LUNG)
            self.bronchus_start[side] = (hilum, bronchus_r * 0.85)

    def _paint_lung_trees(self) -> None:
        """Branching vessels (and bronchi along the first generations) from each hilum to the periphery."""
        rng, k = self.rng, self.k
        step = (max(1, self.nz // 48), max(1, self.size // 96), max(1, self.size // 96))
        coarse = self.tissues[:: step[0], :: step[1], :: step[2]] == Tissue.LUNG
        zz, yy, xx = np.nonzero(coarse)
        points = np.stack([self.xs[xx * step[2]], self.ys[yy * step[1]], self.zs[zz * step[0]]], axis=1)
        vessels: list[tuple[np.ndarray, np.ndarray, float, float]] = []
        bronchi: list[tuple[np.ndarray, np.ndarray, float, float]] = []
        for side in (-1, 1):
            on_side = points[(points[:, 0] - self.xm) * side > 0]
            if len(on_side) < 8:
                continue
            # Two trees per lung: arteries from the hilum, veins from a point below it (towards the atrium).
            arteries: list[tuple[np.ndarray, np.ndarray, float, float, int]] = []
            for tree_index, root in enumerate((self.hilum(side), self.vein_roots[side])):
                targets = on_side[rng.choice(len(on_side), size=min(150, len(on_side)), replace=False)]
                tree: list[tuple[np.ndarray, np.ndarray, float, float, int]] = []
                self._grow(root, targets, float(rng.uniform(6.0, 7.5)) * k, 0, tree)
                vessels += [segment[:4] for segment in tree]
                if tree_index == 0:
                    arteries = tree
            # Bronchi run beside the arteries of the first generations.
            hilum_bronchus, bronchus_r = self.bronchus_start[side]
            for start, end, r0, r1, generation in arteries:
                if generation > 2:
                    continue
                shift = np.cross(end - start, [0.0, 0.0, 1.0])
                norm = float(np.linalg.norm(shift))
                shift = shift / norm * (1.7 * r0 + 2.5 * k) if norm > 1e-6 else np.zeros(3)
                origin = hilum_bronchus if generation == 0 else start + shift
                bronchi.append((origin, end + shift, bronchus_r if generation == 0 else 0.7 * r0, 0.7 * r1))
        self.splat_tubes(vessels, Tissue.LUNG_VESSEL, _LUNG_ONLY)
        wall = 1.2 * k
        self.splat_tubes([(a, b, r0 + wall, r1 + wall) for a, b, r0, r1 in bronchi], Tissue.AIRWAY_WALL, _LUNG_ONLY)
        self.splat_tubes(bronchi, Tissue.AIRWAY, _lut([Tissue.AIRWAY_WALL]))

    def splat_tubes(self, segments: list, tissue: Tissue, onto: np.ndarray) -> None:
        """Paint many thin tapered tubes ``(p0, p1, r0, r1)`` (mm) as chains of balls, all at once.

        Points are spaced at most half a radius apart, so the chain of balls reads as a smooth tube; balls
        are rounded to the nearest voxel and grouped by radius so each group is one vectorised write.
        """
        if not segments:
            return
        sx, sy, sz = self.spacing
        floor = 0.5 * min(sx, sy)
        centres, radii = [], []
        for p0, p1, r0, r1 in segments:
            p0, p1 = np.asarray(p0, dtype=np.float64), np.asarray(p1, dtype=np.float64)
            spacing_along = max(0.5 * max(min(r0, r1), floor), floor)
            count = int(math.ceil(float(np.linalg.norm(p1 - p0)) / spacing_along)) + 1
            t = np.linspace(0.0, 1.0, count)[:, None]
            centres.append(p0 + t * (p1 - p0))
            radii.append(np.maximum(r0 + (r1 - r0) * t[:, 0], floor))
        centre = np.concatenate(centres)
        radius = np.concatenate(radii)
        index = np.rint((centre - np.asarray(self.origin)) / np.asarray(self.spacing)).astype(np.int64)
        inside = np.all((index >= 0) & (index < [self.size, self.size, self.nz]), axis=1)
        index, radius = index[inside], radius[inside]
        quantum = 0.25 * min(sx, sy)
        bins = np.rint(radius / quantum).astype(np.int64)
        flat = self.tissues.reshape(-1)
        plane = self.size * self.size
        for bin_value in np.unique(bins):
            chosen = index[bins == bin_value]
            offsets = self._ball_offsets(bin_value * quantum)
            x = chosen[:, 0:1] + offsets[:, 0]
            y = chosen[:, 1:2] + offsets[:, 1]
            z = chosen[:, 2:3] + offsets[:, 2]
            valid = (x >= 0) & (x < self.size) & (y >= 0) & (y < self.size) & (z >= 0) & (z < self.nz)
            voxels = (z * plane + y * self.size + x)[valid]
            voxels = voxels[onto[flat[voxels]]]
            flat[voxels] = tissue

    def _ball_offsets(self, radius: float) -> np.ndarray:
        """Integer (x, y, z) voxel offsets within ``radius`` mm of a voxel centre, the centre always included."""
        reach = [int(radius // spacing) for spacing in self.spacing]
        grid = np.stack(np.meshgrid(*[np.arange(-r, r + 1) for r in reach], indexing="ij"), axis=-1).reshape(-1, 3)
        inside = np.sum((grid * np.asarray(self.spacing)) ** 2, axis=1) <= radius**2
        return grid[inside]

    def _grow(self, start: np.ndarray, targets: np.ndarray, radius: float, generation: int, segments: list) -> None:
        """Split the targets in two along their widest direction and branch towards each half."""
        rng = self.rng
        if len(targets) <= 2 or radius < 1.0 * self.k:
            for target in targets:
                segments.append((start, target, radius, max(0.6 * radius, 0.7), generation))
            return
        spread = targets - targets.mean(axis=0)
        axis = np.linalg.svd(spread, full_matrices=False)[2][0]
        order = np.argsort(spread @ axis)
        for half in (targets[order[: len(order) // 2]], targets[order[len(order) // 2 :]]):
            centre = half.mean(axis=0)
            end = start + (centre - start) * float(rng.uniform(0.4, 0.6)) + rng.normal(0, 3.0, size=3)
            segments.append((start, end, radius, 0.85 * radius, generation))
            self._grow(end, half, 0.78 * radius, generation + 1, segments)
