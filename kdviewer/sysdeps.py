"""Can Qt start here? The system libraries its xcb platform plugin needs, checked *before* a QApplication
exists (no Qt import here).

Qt aborts the whole process (exit 134, "no Qt platform plugin could be initialized") when the X11 platform
plugin ``libqxcb.so`` cannot be loaded; its hint names ``libxcb-cursor0`` even when other libraries are
what is missing. `check_gui_platform` runs ``ldd`` on the plugin Qt is going to load, maps every library
reported "not found" to its Debian/Ubuntu package (``system-packages.txt`` next to this file, the same
list ``scripts/setup.sh`` and ``.ci/run`` install) and raises `SystemLibrariesMissing` with the one
``apt-get`` command that fixes it, so ``kdviewer`` prints that and exits non-zero instead of aborting.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from kdviewer.errors import KDViewerError

PACKAGES_FILE = Path(__file__).with_name("system-packages.txt")
#: Qt's own libraries ship inside the PySide6 wheel; when one is missing the wheel is broken, not the OS.
_QT_OWN = re.compile(r"^libQt6|^libpyside6|^libshiboken6", re.IGNORECASE)
_LDD_LINE = re.compile(r"^\s*(\S+)\s*=>\s*(not found|\S+)")


class SystemLibrariesMissing(KDViewerError):
    """Qt's platform plugin cannot load: system libraries are missing (the message says how to install)."""

    def __init__(self, message: str, missing: list[str], packages: list[str]) -> None:
        super().__init__(message)
        self.missing = missing
        self.packages = packages


@dataclass(frozen=True)
class SystemPackage:
    name: str
    libraries: tuple[str, ...]


def system_packages(path: Path = PACKAGES_FILE) -> list[SystemPackage]:
    """The Debian/Ubuntu packages of ``system-packages.txt`` with the libraries each provides."""
    out: list[SystemPackage] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, *libs = line.split()
            out.append(SystemPackage(name, tuple(libs)))
    return out


def apt_command(packages: list[str]) -> str:
    """The one command that installs ``packages`` (``sudo`` unless we are root)."""
    sudo = "" if hasattr(os, "geteuid") and os.geteuid() == 0 else "sudo "
    return f"{sudo}apt-get install -y {' '.join(packages)}"


def parse_ldd(text: str) -> dict[str, str | None]:
    """``ldd`` output -> {library: resolved path, or None when "not found"} (each library once)."""
    out: dict[str, str | None] = {}
    for line in text.splitlines():
        m = _LDD_LINE.match(line)
        if m:
            lib, where = m.group(1), m.group(2)
            if where == "not found":
                out[lib] = None
            else:
                out.setdefault(lib, where)
    return out


def ldd(path: str | os.PathLike[str], env: dict[str, str] | None = None, timeout: float = 10.0
        ) -> dict[str, str | None]:
    """Run ``ldd`` on a shared object (with ``env``, e.g. another LD_LIBRARY_PATH); {} without ldd."""
    exe = shutil.which("ldd")
    if exe is None:
        return {}
    try:
        res = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=timeout,
                             env=env, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return parse_ldd(res.stdout)


def missing_libraries(path: str | os.PathLike[str], env: dict[str, str] | None = None) -> list[str]:
    """Shared libraries ``path`` needs that the dynamic loader cannot find (in ldd's order)."""
    return [lib for lib, where in ldd(path, env).items() if where is None]


def packages_for(missing: list[str], packages: list[SystemPackage] | None = None
                 ) -> tuple[list[str], list[str]]:
    """(Debian packages providing ``missing``, libraries no listed package provides)."""
    by_lib = {lib: p.name for p in (packages or system_packages()) for lib in p.libraries}
    found: list[str] = []
    unknown: list[str] = []
    for lib in missing:
        pkg = by_lib.get(lib)
        if pkg is None:
            unknown.append(lib)
        elif pkg not in found:
            found.append(pkg)
    return found, unknown


def qt_platform_plugin(name: str = "xcb") -> Path | None:
    """The platform plugin Qt will load (``QT_QPA_PLATFORM_PLUGIN_PATH`` first, as Qt does, then the
    plugins folder of the installed PySide6), or None when there is none."""
    fname = f"libq{name}.so"
    override = os.environ.get("QT_QPA_PLATFORM_PLUGIN_PATH")
    if override:
        for d in override.split(os.pathsep):
            if d and (Path(d) / fname).is_file():
                return Path(d) / fname
    import importlib.util

    spec = importlib.util.find_spec("PySide6")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "Qt" / "plugins" / "platforms" / fname
        if p.is_file():
            return p
    return None


def wanted_platform() -> str | None:
    """The Qt platform the viewer will start on Linux: "xcb" (an X display), None when it is something
    this check does not cover (offscreen when headless, wayland, eglfs ...) or not Linux."""
    if not sys.platform.startswith("linux"):
        return None
    explicit = os.environ.get("QT_QPA_PLATFORM", "").split(";")[0].split(":")[0].strip()
    if explicit:
        return "xcb" if explicit == "xcb" else None
    if os.environ.get("WAYLAND_DISPLAY"):
        return None
    return "xcb" if os.environ.get("DISPLAY") else None


def missing_message(missing: list[str], packages: list[str], unknown: list[str], plugin: Path) -> str:
    lines = [
        "the viewer cannot start: Qt's X11 platform plugin needs system libraries that are not installed:",
        "  missing: " + ", ".join(missing),
    ]
    if packages:
        lines += ["install them with:", f"  {apt_command(packages)}",
                  "(or run scripts/setup.sh from the kdviewer source folder, which installs the whole list)"]
    qt_own = [u for u in unknown if _QT_OWN.match(u)]
    other = [u for u in unknown if not _QT_OWN.match(u)]
    if qt_own:
        lines.append("PySide6's own Qt libraries are missing (a broken install): "
                     "pip install --force-reinstall PySide6-Essentials")
    if other:
        lines.append("not in kdviewer's package list (find the package that provides each): "
                     + ", ".join(other))
    lines += [f"(checked with: ldd {plugin})",
              "the command-line tools (classify, predict, info) work without them"]
    return "\n".join(lines)


class DisplayUnreachable(KDViewerError):
    """``DISPLAY`` names an X server nobody answers at (Qt would abort with exit 134)."""


def display_reachable(display: str, timeout: float = 1.0) -> bool | None:
    """Whether an X server answers at ``display`` (":1", "unix:0", "localhost:10.0"); None = cannot tell."""
    import socket

    m = re.match(r"^(?P<host>[^:]*):(?P<num>\d+)(?:\.\d+)?$", display.strip())
    if m is None:
        return None
    host, num = m.group("host"), int(m.group("num"))
    if host in ("", "unix"):
        for addr in (f"/tmp/.X11-unix/X{num}", f"\0/tmp/.X11-unix/X{num}"):  # file, then abstract socket
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(timeout)
                try:
                    s.connect(addr)
                    return True
                except OSError:
                    continue
        if host == "unix":
            return False
        host = "localhost"
    try:
        with socket.create_connection((host, 6000 + num), timeout=timeout):
            return True
    except OSError:
        return False


def check_gui_platform() -> None:
    """Raise `SystemLibrariesMissing` when Qt's xcb platform plugin cannot load here, `DisplayUnreachable`
    when no X server answers at ``DISPLAY``; a no-op when the viewer will not use xcb (headless/offscreen,
    Wayland, not Linux). Both are what makes Qt abort the process instead of raising."""
    if wanted_platform() != "xcb":
        return
    plugin = qt_platform_plugin("xcb")
    if plugin is not None:
        missing = missing_libraries(plugin)
        if missing:
            packages, unknown = packages_for(missing)
            message = missing_message(missing, packages, unknown, plugin)
            raise SystemLibrariesMissing(message, missing, packages)
    display = os.environ.get("DISPLAY", "")
    if display and display_reachable(display) is False:
        raise DisplayUnreachable(
            f"the viewer cannot start: no X display answers at DISPLAY={display}. Run it inside a desktop "
            "session (or `xvfb-run -a kdviewer` without one); `kdviewer render CASE -o out.png` draws the "
            "same view headless"
        )


def main(argv: list[str] | None = None) -> int:
    """``python -m kdviewer.sysdeps [--packages]``: print the package list, or check the xcb plugin."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--packages"]:
        print(" ".join(p.name for p in system_packages()))
        return 0
    plugin = qt_platform_plugin("xcb")
    if plugin is None:
        print("no Qt xcb platform plugin found (is PySide6 installed?)")
        return 1
    missing = missing_libraries(plugin)
    if not missing:
        print(f"ok: every library {plugin.name} needs is installed")
        return 0
    packages, unknown = packages_for(missing)
    print(missing_message(missing, packages, unknown, plugin))
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
