"""Synthetic chest phantoms for tests, demos and benchmarks - labelled SYNTHETIC wherever they appear.

* ``cxr``: frontal chest radiograph phantom (body, lungs, heart, mediastinum, ribs, spine, clavicles,
  diaphragm, vessels, exposure variation, quantum noise). Classes ``normal`` / ``pneumonia``; pneumonia
  cases carry patchy consolidations strictly inside the lung fields.
* ``ct``: axial chest CT in Hounsfield units (air -1000, fat ~-95, soft tissue ~40, lung ~-860 with
  vessels, bone ~400-850, table) written as real CT DICOM. Classes ``mild`` / ``severe``: severe cases
  carry ground glass (~-500 HU) with consolidation (~30 HU); mild cases one small faint focus or none.

``difficulty`` in [0, 1] makes lesions fainter and smaller and noise / anatomy more variable.
Everything is deterministic per seed and the files carry no timestamps: the same arguments give
byte-identical output. Public API:

* `generate` - write a dataset (class folders, masks, labels.csv, SYNTHETIC.txt); `add_cli` registers
  ``kd-train synth``.
* `render_cxr`, `render_ct_slice` - one image (and its lesion mask) from a generator.
* `cxr_phantom`, `ct_case` + `render_ct` - the same with more ground truth (lung masks, anatomy reuse,
  consistent CT volumes).
* `write_ct_dicom`, `write_dx_dicom` - the DICOM writers.
"""

from __future__ import annotations

from .ct import CT_FOV_MM, CtAnatomy, CtCase, CtSlice, ct_anatomy, ct_case, render_ct, render_ct_slice
from .cxr import CxrAnatomy, CxrPhantom, cxr_anatomy, cxr_phantom, render_cxr
from .dataset import CSV_COLUMNS, CT_CLASSES, CXR_CLASSES, SLICE_MM, add_cli, generate
from .dicom import CXR_FOV_MM, PATIENT_NAME, synthetic_uid, write_ct_dicom, write_dx_dicom

__all__ = [
    "CSV_COLUMNS",
    "CT_CLASSES",
    "CT_FOV_MM",
    "CXR_CLASSES",
    "CXR_FOV_MM",
    "PATIENT_NAME",
    "SLICE_MM",
    "CtAnatomy",
    "CtCase",
    "CtSlice",
    "CxrAnatomy",
    "CxrPhantom",
    "add_cli",
    "ct_anatomy",
    "ct_case",
    "cxr_anatomy",
    "cxr_phantom",
    "generate",
    "render_ct",
    "render_ct_slice",
    "render_cxr",
    "synthetic_uid",
    "write_ct_dicom",
    "write_dx_dicom",
]
