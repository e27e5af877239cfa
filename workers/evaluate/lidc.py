"""LIDC-IDRI readings (``LidcReadMessage`` XML beside the DICOM series) under the LUNA16 rule.

The LIDC format (Armato et al., Medical Physics 38:915-931, 2011): each ``readingSession`` is
one radiologist's unblinded read. An ``unblindedReadNodule`` with outlines (``roi`` per slice,
keyed by ``imageSOP_UID``, its ``edgeMap`` points in image columns/rows) is a nodule the reader
judged >= 3 mm; one whose rois are single points is a < 3 mm nodule; a ``nonNodule`` is a
single ``locus`` point.

Reference rule (LUNA16, Setio et al., Medical Image Analysis 42:1-13, 2017):

* the >= 3 mm marks of all readers are grouped into nodules: two marks belong to the same
  nodule when their centres lie closer than the sum of their radii (overlapping balls), and
  groups are closed transitively;
* a group marked by >= 3 distinct readers is a positive; its centre and diameter are the means
  of its marks'. A mark's centre is the area-weighted centroid of its included outlines; its
  diameter is that of the ball of the same volume (outline areas, less excluded outlines, times
  the slice spacing), the volume-equivalent diameter of the LIDC size lists;
* groups of 1-2 readers, < 3 mm marks and non-nodules are ignore regions of radius
  max(radius, 5 mm) (:data:`references.IGNORE_MIN_RADIUS_MM`): neither hit nor false positive.

Parsed with :mod:`xml.etree.ElementTree`, not ``pylidc``: pylidc 0.2.3 (the current release)
imports ``pkg_resources`` (gone from setuptools >= 81), uses ``np.int``/``np.float``/``np.bool``
(removed in numpy 1.24) and SQLAlchemy's legacy ``declarative_base``; it also reads only its
bundled database, so it cannot read a site's own XML files (nor the test's).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from workers.evaluate.references import (
    Reference,
    dicom_files,
    dicom_loader,
    ignore_region,
    read_series_headers,
)

MIN_READERS = 3
ROOT_TAG = "LidcReadMessage"


@dataclass(frozen=True)
class Mark:
    """One reader's mark, in patient LPS mm."""

    reader: int
    kind: str
    """``nodule`` (>= 3 mm, outlined), ``small`` (< 3 mm, a point) or ``non-nodule``."""
    center_mm: tuple[float, float, float]
    diameter_mm: float | None = None


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _kids(el: ET.Element, name: str) -> list[ET.Element]:
    return [c for c in el if _local(c.tag) == name]


def _text(el: ET.Element, name: str) -> str | None:
    for c in el.iter():
        if _local(c.tag) == name and c.text is not None:
            return c.text.strip()
    return None


class SliceGeometry:
    """Maps (SOP Instance UID or z, column, row) to patient LPS mm from the series headers."""

    def __init__(self, headers: list[Any]) -> None:
        self._by_uid: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        for ds in headers:
            if "ImagePositionPatient" not in ds or "PixelSpacing" not in ds:
                continue
            iop = np.array([float(v) for v in ds.ImageOrientationPatient])
            row_mm, col_mm = (float(v) for v in ds.PixelSpacing)
            frame = (
                np.array([float(v) for v in ds.ImagePositionPatient]),
                iop[:3] * col_mm,  # one column step
                iop[3:] * row_mm,  # one row step
            )
            self._by_uid[str(ds.SOPInstanceUID)] = frame
        if not self._by_uid:
            raise ValueError("the LIDC reading's series has no images with a position")
        normal = np.cross(*next(iter(self._by_uid.values()))[1:])
        offsets = np.unique(
            [float(f[0] @ normal) / np.linalg.norm(normal) for f in self._by_uid.values()]
        )
        self.slice_spacing = float(np.median(np.diff(offsets))) if len(offsets) > 1 else 1.0
        """Median distance between adjacent slices, mm."""

    def frame(self, sop_uid: str | None, z: float | None) -> tuple[np.ndarray, ...]:
        if sop_uid in self._by_uid:
            return self._by_uid[str(sop_uid)]
        if z is None:
            raise ValueError("an LIDC mark names no known image and no z position")
        # An image missing from the series: the slice nearest in z.
        return min(self._by_uid.values(), key=lambda f: abs(float(f[0][2]) - z))

    def point(self, frame: tuple[np.ndarray, ...], col: float, row: float) -> np.ndarray:
        origin, step_i, step_j = frame
        return np.asarray(origin + col * step_i + row * step_j, dtype=np.float64)


def _float(text: str | None) -> float | None:
    return float(text) if text not in (None, "") else None


def _roi_points(roi: ET.Element) -> np.ndarray:
    return np.array(
        [
            [float(_text(e, "xCoord") or 0), float(_text(e, "yCoord") or 0)]
            for e in _kids(roi, "edgeMap")
        ]
    ).reshape(-1, 2)


def _polygon(points: np.ndarray) -> tuple[float, np.ndarray]:
    """Area (pixel units) and centroid (column, row) of a closed outline; a degenerate outline
    (a point, a line) has area 0 and the mean of its points."""
    x, y = points[:, 0], points[:, 1]
    cross = x * np.roll(y, -1) - np.roll(x, -1) * y
    area = cross.sum() / 2
    if len(points) < 3 or abs(area) < 1e-9:
        return 0.0, points.mean(axis=0)
    cx = ((x + np.roll(x, -1)) * cross).sum() / (6 * area)
    cy = ((y + np.roll(y, -1)) * cross).sum() / (6 * area)
    return float(abs(area)), np.array([cx, cy])


def _nodule_mark(reader: int, nodule: ET.Element, geo: SliceGeometry) -> Mark | None:
    centres, weights = [], []
    volume = 0.0
    outlined = False
    for roi in _kids(nodule, "roi"):
        pts = _roi_points(roi)
        if len(pts) == 0:
            continue
        frame = geo.frame(_text(roi, "imageSOP_UID"), _float(_text(roi, "imageZposition")))
        area, (cx, cy) = _polygon(pts)
        area_mm2 = area * float(np.linalg.norm(np.cross(frame[1], frame[2])))
        if (_text(roi, "inclusion") or "TRUE").upper() != "TRUE":
            volume -= area_mm2 * geo.slice_spacing  # a hole in the nodule
            continue
        outlined |= len(pts) > 1
        centres.append(geo.point(frame, cx, cy))
        weights.append(area_mm2)
        volume += area_mm2 * geo.slice_spacing
    if not centres:
        return None
    w = np.array(weights) if sum(weights) > 0 else np.ones(len(centres))
    centre = (np.array(centres) * w[:, None]).sum(axis=0) / w.sum()
    c = (float(centre[0]), float(centre[1]), float(centre[2]))
    if not outlined:
        return Mark(reader, "small", c)
    return Mark(reader, "nodule", c, float((6 * max(volume, 0.0) / np.pi) ** (1 / 3)))


def read_marks(xml_path: Path, geo: SliceGeometry) -> tuple[str | None, list[Mark]]:
    """The series UID an LIDC XML reading names, and every reader's marks in it."""
    root = ET.parse(xml_path).getroot()
    series_uid = _text(root, "SeriesInstanceUid")
    marks: list[Mark] = []
    for reader, session in enumerate(_kids(root, "readingSession")):
        for nodule in _kids(session, "unblindedReadNodule"):
            mark = _nodule_mark(reader, nodule, geo)
            if mark is not None:
                marks.append(mark)
        for non in _kids(session, "nonNodule"):
            locus = [e for e in non.iter() if _local(e.tag) == "locus"]
            if not locus:
                continue
            col, row = float(_text(locus[0], "xCoord") or 0), float(_text(locus[0], "yCoord") or 0)
            frame = geo.frame(_text(non, "imageSOP_UID"), _float(_text(non, "imageZposition")))
            p = geo.point(frame, col, row)
            marks.append(Mark(reader, "non-nodule", (float(p[0]), float(p[1]), float(p[2]))))
    return series_uid, marks


def group_nodules(marks: list[Mark]) -> list[list[Mark]]:
    """The >= 3 mm marks grouped into nodules (centres closer than the sum of the radii)."""
    big = [m for m in marks if m.kind == "nodule"]
    parent = list(range(len(big)))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a in range(len(big)):
        for b in range(a + 1, len(big)):
            reach = ((big[a].diameter_mm or 0) + (big[b].diameter_mm or 0)) / 2
            if np.linalg.norm(np.subtract(big[a].center_mm, big[b].center_mm)) <= reach:
                parent[find(a)] = find(b)
    groups: dict[int, list[Mark]] = {}
    for i, m in enumerate(big):
        groups.setdefault(find(i), []).append(m)
    return list(groups.values())


def luna16_rule(marks: list[Mark]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(positives, ignore regions) of one scan's marks under the LUNA16 rule."""
    positives: list[dict[str, Any]] = []
    ignore: list[dict[str, Any]] = []
    for group in group_nodules(marks):
        readers = len({m.reader for m in group})
        centre = np.mean([m.center_mm for m in group], axis=0)
        diameter = float(np.mean([m.diameter_mm or 0.0 for m in group]))
        if readers >= MIN_READERS:
            positives.append(
                {
                    "center_mm": [round(float(c), 2) for c in centre],
                    "diameter_mm": round(diameter, 2),
                    "readers": readers,
                }
            )
        else:
            why = f"nodule marked by {readers} of 4 readers"
            ignore.append({**ignore_region(centre, diameter, why), "readers": readers})
    for m in marks:
        if m.kind == "small":
            ignore.append(ignore_region(m.center_mm, None, "nodule < 3 mm, one reader"))
        elif m.kind == "non-nodule":
            ignore.append(ignore_region(m.center_mm, None, "non-nodule mark, one reader"))
    return positives, ignore


def is_lidc_xml(path: Path) -> bool:
    """Whether ``path`` is an LIDC reading (its root element is ``LidcReadMessage``)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except OSError:
        return False
    return ROOT_TAG.encode() in head


def read_lidc(folder: Path) -> list[Reference]:
    """One reference per series that an LIDC XML reading in ``folder`` annotates."""
    xmls = sorted(p for p in folder.glob("*.xml") if is_lidc_xml(p))
    files = dicom_files(folder, skip=lambda p: p.suffix.lower() in (".xml", ".json", ".md"))
    headers, _ = read_series_headers(files)
    marks_by_series: dict[str, list[Mark]] = {}
    for xml_path in xmls:
        uid = str(ET.parse(xml_path).getroot().findtext(".//{*}SeriesInstanceUid") or "")
        if uid not in headers:
            continue  # a reading of a series that is not here (a chest radiograph reading)
        _, marks = read_marks(xml_path, SliceGeometry(headers[uid]))
        offset = len({m.reader for m in marks_by_series.get(uid, [])})
        marks_by_series.setdefault(uid, []).extend(
            Mark(m.reader + offset, m.kind, m.center_mm, m.diameter_mm) for m in marks
        )
    refs = []
    for uid, marks in sorted(marks_by_series.items()):
        positives, ignore = luna16_rule(marks)
        refs.append(Reference(uid, "lidc", positives, ignore, dicom_loader(files, uid)))
    return refs
