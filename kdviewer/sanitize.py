"""Text that came from outside (file names, DICOM strings, bundle manifests) made safe for an output.

* `plain`: one line of printable text for a terminal or a log: control characters (ANSI escape
  sequences included) are removed, line breaks and tabs become spaces.
* `csv_text`: a spreadsheet cell that cannot run as a formula: `plain`, then a leading ``= + - @``
  gets a ``'`` in front (the OWASP "CSV injection" rule).
* `csv_path`: a path cell kept *exactly* (the row must name the real file for resume), made inert by
  writing a relative path that starts with a formula character as ``./name`` (the same file).
"""

from __future__ import annotations

import re

#: ANSI/VT escape sequences (CSI ... final byte, OSC ... BEL/ST, and lone two-byte escapes).
_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[@-Z\\-_])")
_CONTROLS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_BREAKS = re.compile(r"[\t\n\r\u2028\u2029]+")
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r", "\n")


def plain(text: object) -> str:
    """``text`` as one printable line: escapes and control characters removed, breaks -> spaces."""
    s = _ANSI.sub("", str(text))
    s = _BREAKS.sub(" ", s)
    return _CONTROLS.sub("", s)


def csv_text(text: object) -> str:
    """A CSV cell for free text (labels, error messages): `plain`, never starting a formula."""
    s = " ".join(plain(text).split())
    return "'" + s if s.startswith(FORMULA_PREFIXES) else s


def csv_path(path: str) -> str:
    """A CSV cell naming a file exactly; a relative path that would start a formula gets ``./``."""
    return "./" + path if path.startswith(FORMULA_PREFIXES) else path
