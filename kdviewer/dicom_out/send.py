"""Push the written objects to a PACS with DICOM C-STORE (pynetdicom), one association per call.

``kdviewer predict/classify --dicom-out DIR --send HOST:PORT --aet PACS_AE`` sends each case's SR and SC
right after they are written. Files go as written (Explicit VR Little Endian); the association proposes
exactly their storage classes. Every failure is a `DicomSendError` naming the host, port and AE titles.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import pydicom

from kdviewer.errors import DicomExportError

log = logging.getLogger(__name__)

DEFAULT_CALLING_AET = "KDVIEWER"


class DicomSendError(DicomExportError):
    """The objects were written but could not be stored on the remote DICOM node."""


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port); ValueError with a usable message otherwise."""
    host, sep, port = str(text).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not HOST:PORT (e.g. pacs.example.org:104)")
    return host.strip("[]"), int(port)


def _check_aet(aet: str, what: str) -> str:
    aet = str(aet).strip()
    if not aet or len(aet) > 16 or "\\" in aet or not aet.isprintable():
        raise DicomSendError(
            f"{what} AE title {aet!r} is not valid (1-16 printable characters, no backslash)")
    return aet


def send_files(
    paths: Sequence[str | os.PathLike[str]],
    host: str,
    port: int,
    called_aet: str,
    calling_aet: str = DEFAULT_CALLING_AET,
    timeout_s: float = 30.0,
) -> int:
    """C-STORE every file in ``paths`` to ``called_aet`` at ``host:port``; returns how many were stored.

    Raises:
        DicomSendError: the node cannot be reached, refuses the association or a storage class, or
            answers a C-STORE with a failure status.
    """
    from pynetdicom import AE

    called = _check_aet(called_aet, "the PACS (called)")
    calling = _check_aet(calling_aet, "kdviewer's (calling)")
    datasets = [pydicom.dcmread(p) for p in paths]
    where = f"{called}@{host}:{port} (calling AE {calling})"
    if not datasets:
        return 0
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    for sop_class, syntax in sorted({(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
                                     for ds in datasets}):
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate(host, port, ae_title=called)
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "not established"
        raise DicomSendError(
            f"could not open a DICOM association with {where}: {why}; check the host, the port and that "
            "the PACS knows kdviewer's AE title"
        )
    stored = 0
    try:
        for path, ds in zip(paths, datasets, strict=True):
            try:
                status = assoc.send_c_store(ds)
            except ValueError as exc:  # no accepted presentation context for this storage class
                raise DicomSendError(f"{where} does not accept {Path(path).name}: {exc}") from exc
            code = getattr(status, "Status", None)
            if code is None:
                raise DicomSendError(f"{where} did not answer the C-STORE of {Path(path).name} (timeout or "
                                     "connection lost)")
            if code not in (0x0000, 0xB000, 0xB006, 0xB007):  # success or warning
                raise DicomSendError(f"{where} refused {Path(path).name}: C-STORE status 0x{code:04X}")
            stored += 1
            log.info("stored %s on %s", Path(path).name, where)
    finally:
        assoc.release()
    return stored
