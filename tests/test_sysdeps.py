"""First launch: the system libraries Qt's X11 plugin needs, found with ldd on the real plugin before a
QApplication exists, and `kdviewer` exiting cleanly with the apt-get command instead of Qt's abort (134).

The missing-library case is real, not simulated: a copy of the installed ``libqxcb.so`` in a folder of
its own cannot find Qt's libraries (its RPATH points at ``$ORIGIN/../../lib``), and pointing the loader's
search path (LD_LIBRARY_PATH) at PySide6's Qt/lib finds them again.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kdviewer.sysdeps import (
    apt_command,
    display_reachable,
    missing_libraries,
    packages_for,
    parse_ldd,
    qt_platform_plugin,
    system_packages,
)

ROOT = Path(__file__).resolve().parents[1]

needs_ldd = pytest.mark.skipif(shutil.which("ldd") is None or not sys.platform.startswith("linux"),
                               reason="ldd (Linux) needed")


def test_package_list_is_the_one_source() -> None:
    pkgs = system_packages()
    names = [p.name for p in pkgs]
    assert len(names) == len(set(names)) >= 20
    # the two libraries the fresh Debian lacked, and the one Qt's own hint names
    by_lib = {lib: p.name for p in pkgs for lib in p.libraries}
    assert by_lib["libxcb-icccm.so.4"] == "libxcb-icccm4"
    assert by_lib["libxcb-keysyms.so.1"] == "libxcb-keysyms1"
    assert by_lib["libxcb-cursor.so.0"] == "libxcb-cursor0"
    # setup.sh reads the same file, and .ci/run goes through setup.sh (no second list)
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert "kdviewer/system-packages.txt" in setup
    ci = (ROOT / ".ci" / "run").read_text()
    assert "scripts/setup.sh" in ci and "libxcb" not in ci


def test_parse_ldd_text() -> None:
    text = (
        "\tlinux-vdso.so.1 (0x00007ffc)\n"
        "\tlibQt6XcbQpa.so.6 => /x/Qt/lib/libQt6XcbQpa.so.6 (0x00007f07)\n"
        "\tlibxcb-icccm.so.4 => not found\n"
        "\tlibxcb.so.1 => /lib/x86_64-linux-gnu/libxcb.so.1 (0x00007f06)\n"
        "\tlibxcb-icccm.so.4 => not found\n"
        "\t/lib64/ld-linux-x86-64.so.2 (0x00007f08)\n"
    )
    assert parse_ldd(text) == {
        "libQt6XcbQpa.so.6": "/x/Qt/lib/libQt6XcbQpa.so.6",
        "libxcb-icccm.so.4": None,
        "libxcb.so.1": "/lib/x86_64-linux-gnu/libxcb.so.1",
    }
    assert packages_for(["libxcb-icccm.so.4", "libxcb-keysyms.so.1", "libfoo.so.9"]) == (
        ["libxcb-icccm4", "libxcb-keysyms1"], ["libfoo.so.9"])
    assert apt_command(["a", "b"]).endswith("apt-get install -y a b")


@needs_ldd
def test_ldd_on_the_real_xcb_plugin(tmp_path: Path) -> None:
    plugin = qt_platform_plugin("xcb")
    if plugin is None:
        pytest.skip("this PySide6 has no xcb platform plugin")
    from kdviewer.sysdeps import ldd

    deps = ldd(plugin)
    assert "libxcb.so.1" in deps and any(k.startswith("libQt6") for k in deps)
    assert deps["libQt6XcbQpa.so.6"] is not None  # found through the plugin's RPATH
    # every library ldd could not find is named, mapped to a package or reported as unknown
    missing = missing_libraries(plugin)
    found, unknown = packages_for(missing)
    assert len(found) + len(unknown) <= len(missing)

    # the same binary alone in another folder: its RPATH no longer leads to Qt's libraries ...
    alone = tmp_path / "plugins" / "platforms"
    alone.mkdir(parents=True)
    copy = Path(shutil.copy2(plugin, alone / plugin.name))
    lost = missing_libraries(copy, env={k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"})
    assert "libQt6XcbQpa.so.6" in lost and "libQt6Gui.so.6" in lost
    assert set(missing) <= set(lost)
    # ... and a library search path pointing at them finds them again
    qt_lib = plugin.parents[2] / "lib"
    env = dict(os.environ, LD_LIBRARY_PATH=str(qt_lib))
    assert not [m for m in missing_libraries(copy, env=env) if m.startswith("libQt6")]


@needs_ldd
def test_kdviewer_prints_the_missing_libraries_instead_of_aborting(tmp_path: Path) -> None:
    """`kdviewer` (the viewer) with a Qt platform plugin that cannot load: a clean exit 1 with the missing
    libraries and the fix, no Qt abort (exit 134). Qt's own QT_QPA_PLATFORM_PLUGIN_PATH selects the copy."""
    plugin = qt_platform_plugin("xcb")
    if plugin is None:
        pytest.skip("this PySide6 has no xcb platform plugin")
    alone = tmp_path / "platforms"
    alone.mkdir()
    shutil.copy2(plugin, alone / plugin.name)
    env = {k: v for k, v in os.environ.items() if k not in ("QT_QPA_PLATFORM", "WAYLAND_DISPLAY",
                                                             "LD_LIBRARY_PATH")}
    env.update(DISPLAY=":97", QT_QPA_PLATFORM_PLUGIN_PATH=str(alone), PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-m", "kdviewer.cli"], env=env, capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert res.returncode == 1, res.stderr
    assert "missing: " in res.stderr and "libQt6XcbQpa.so.6" in res.stderr
    assert "pip install --force-reinstall PySide6-Essentials" in res.stderr
    assert f"ldd {alone / plugin.name}" in res.stderr
    assert "Aborted" not in res.stderr and "could not be initialized" not in res.stderr


def test_unreachable_display_is_a_clean_error(tmp_path: Path) -> None:
    assert display_reachable(":97") is False  # nothing listens there
    assert display_reachable("not-a-display") is None
    env = {k: v for k, v in os.environ.items() if k not in ("QT_QPA_PLATFORM", "WAYLAND_DISPLAY")}
    env.update(DISPLAY=":97", PYTHONPATH=str(ROOT))
    env.pop("QT_QPA_PLATFORM_PLUGIN_PATH", None)
    res = subprocess.run([sys.executable, "-m", "kdviewer.cli"], env=env, capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert res.returncode == 1 and "no X display answers at DISPLAY=:97" in res.stderr
    assert "Aborted" not in res.stderr


@pytest.mark.skipif(shutil.which("dpkg-query") is None, reason="Debian/Ubuntu only")
def test_setup_script_check_mode_reports_what_is_missing(tmp_path: Path) -> None:
    """`setup.sh --check` over the real list (plus one package that is surely not installed)."""
    env = dict(os.environ, SETUP_EXTRA_PACKAGES="kdviewer-no-such-package")
    res = subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh"), "--check"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    assert "kdviewer-no-such-package" in res.stdout and "apt-get install -y" in res.stdout
