"""The Qt binding must not corrupt Python reference counts when Python code emits signals.

PySide6 6.12.0 on Python < 3.12 drops one reference to ``True`` per ``Signal.emit`` called from Python
(and pyqtgraph's paths leak ``None`` the same way): a GUI process holds a few thousand references to
``True``, so the training panel's live curves (several emits per redraw) kill the app with
"Fatal Python error: bool_dealloc / none_dealloc" after a minute or two of training. 6.11.x is fine;
Python >= 3.12 makes True/None immortal, which hides the bug. This test fails on an affected install.
"""

from __future__ import annotations

import sys

import pytest
from PySide6.QtCore import QObject, Signal

pytestmark = pytest.mark.gui


class _Emitter(QObject):
    fired = Signal(object)


def test_signal_emit_keeps_true_and_none_refcounts(qapp) -> None:
    e = _Emitter()
    got: list[object] = []
    e.fired.connect(got.append)
    before_true, before_none = sys.getrefcount(True), sys.getrefcount(None)
    for _ in range(50):
        e.fired.emit({"value": None})
    lost_true = before_true - sys.getrefcount(True)
    lost_none = before_none - sys.getrefcount(None)
    # undo the damage so the rest of the session is not put at risk by this test
    _pad = [True] * max(lost_true, 0) + [None] * max(lost_none, 0)
    _KEEP.append(_pad)
    assert len(got) == 50
    assert lost_true <= 0 and lost_none <= 0, (
        f"this PySide6 build leaks references to True ({lost_true}) / None ({lost_none}) on every "
        "Signal.emit: the GUI will crash after a few thousand signals (use PySide6 != 6.12.0, or "
        "Python >= 3.12)"
    )


_KEEP: list[list[object]] = []
