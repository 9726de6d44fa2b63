"""Results back into the clinical workflow: a DICOM Structured Report and a Secondary Capture per case.

No Qt and no torch here: highdicom builds the objects, pydicom writes them. Callers (``kdviewer predict
/ classify --dicom-out``, the viewer's File > Export result as DICOM...) compute the saliency map with
`kdviewer.inference.saliency.explain` and hand it in.

Which SR template and IOD, and why:

* **TID 1500 "Imaging Measurement Report" in a Comprehensive SR (1.2.840.10008.5.1.4.1.1.88.33).**
  TID 1500 is the template the IHE AI Results (AIR) profile prescribes for AI output and the one
  PACS, OHIF, 3D Slicer (dcmqi) and highdicom read back; its Measurement Group (TID 1501) has a slot
  for each thing a classifier result must carry: a tracking UID, the algorithm's identity (TID 4019:
  name, version = bundle hash, parameters incl. training data), NUM items (one calibrated probability
  per class, the OOD score), CODE items (predicted class, OOD flag, modality gate, teacher
  disagreement) and IMAGE references to the source instances. A free-form Comprehensive SR would hold
  the same values but no reader would know where to look. The Comprehensive SR IOD (rather than
  Enhanced SR) because it is the most widely accepted SR storage class that can hold TID 1500, and
  Comprehensive 3D SR adds nothing here (no 3D coordinates). The tree is drawn in
  `kdviewer.dicom_out.report`; codes without a standard equivalent use the local scheme ``99KDV``,
  declared in the SR's Coding Scheme Identification Sequence.
* **Secondary Capture Image Storage (1.2.840.10008.5.1.4.1.1.7)**, RGB 8-bit: the rendered view with
  the saliency overlay and a burned-in legend (BurnedInAnnotation YES), for viewers that do not
  render SR (`kdviewer.dicom_out.capture`).

Linking: a DICOM source keeps its StudyInstanceUID; the SR lists every source instance the model read
(SOP Instance UIDs, frame numbers for multi-frame objects) as TID 1501 source images and as evidence;
the SC references the instance it shows (Source Image Sequence). The SR and the SC go into two *new*
series of that study — two, not one, because Modality is a series attribute and an SR ("SR") and an
SC ("OT") cannot share a series without breaking the standard. A non-DICOM source (PNG/JPEG) gets a new
study with an empty patient module, and the SR says "Non-DICOM source" and references the SC.

PHI: only the Patient and General Study module attributes of a DICOM source are copied, and only into
these DICOM objects (`kdviewer.dicom_out.sources`); the legend burned into the SC has no identifiers.
"""

from kdviewer.dicom_out.capture import Overlay, render
from kdviewer.dicom_out.export import ExportedCase, export_case, output_stem
from kdviewer.dicom_out.identity import ModelIdentity, bundle_hash
from kdviewer.dicom_out.report import read_result
from kdviewer.dicom_out.sources import SourceInfo, describe_source

__all__ = [
    "ExportedCase",
    "ModelIdentity",
    "Overlay",
    "SourceInfo",
    "bundle_hash",
    "describe_source",
    "export_case",
    "output_stem",
    "read_result",
    "render",
]
