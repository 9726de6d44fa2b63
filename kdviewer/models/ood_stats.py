"""Reading a bundle's ``ood.npz`` safely (numpy only; used by `open_bundle` and the OOD guard).

The .npy headers inside the archive are read first: float arrays "mean" (D,) and "precision" (D, D)
with 1 <= D <= `MAX_OOD_DIM`, so a header claiming 10^12 floats is refused without allocating;
nothing is unpickled (object arrays are refused); the values must be finite (a NaN would keep the
guard from ever flagging).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

#: Largest feature size an ``ood.npz`` may describe (a (D, D) precision of 16384 is 1 GiB of float32).
MAX_OOD_DIM = 16384


def _npz_headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of each array of an .npz, read from the .npy headers only (nothing allocated)."""
    import zipfile

    out: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with zf.open(info) as fh:
                version = np.lib.format.read_magic(fh)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
                elif version == (2, 0):
                    shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
                else:
                    raise ValueError(f"{info.filename}: unsupported .npy version {version}")
            out[info.filename[:-4]] = (tuple(int(n) for n in shape), dtype)
    return out


def read_ood_stats(path: str | Path) -> dict[str, np.ndarray]:
    """Read an ``ood.npz`` without unpickling anything; ValueError when arrays are missing/malformed.

    The .npy headers are checked first (shapes, float dtypes, a feature size of at most
    `MAX_OOD_DIM`), so a header claiming 10^12 floats is refused without allocating; the values must
    be finite (a NaN would keep the guard from ever flagging).
    """
    path = Path(path)
    try:
        headers = _npz_headers(path)
    except (OSError, EOFError, KeyError) as exc:
        raise ValueError(f"{path.name} is not a readable .npz archive ({exc})") from exc
    except Exception as exc:  # zipfile.BadZipFile, a damaged .npy header (ValueError, SyntaxError...)
        raise ValueError(f"{path.name} is not a readable .npz archive ({type(exc).__name__}: {exc})") from exc
    missing = {"mean", "precision"} - set(headers)
    if missing:
        raise ValueError(f"{path.name} lacks arrays: {', '.join(sorted(missing))}")
    (mshape, mdtype), (pshape, pdtype) = headers["mean"], headers["precision"]
    if mdtype.kind != "f" or pdtype.kind != "f":
        raise ValueError(f"{path.name}: mean and precision must be float arrays, not {mdtype} / {pdtype}")
    if len(mshape) != 1 or not 1 <= mshape[0] <= MAX_OOD_DIM:
        raise ValueError(f"{path.name}: mean must be a vector of 1..{MAX_OOD_DIM} features, not {mshape}")
    if pshape != (mshape[0], mshape[0]):
        raise ValueError(f"{path.name}: mean {mshape} and precision {pshape} do not match")
    with np.load(path, allow_pickle=False) as data:
        mean = np.asarray(data["mean"], dtype=np.float32)
        prec = np.asarray(data["precision"], dtype=np.float32)
    if mean.ndim != 1 or prec.shape != (mean.shape[0], mean.shape[0]):
        raise ValueError(f"{path.name}: mean {mean.shape} and precision {prec.shape} do not match")
    if not (np.isfinite(mean).all() and np.isfinite(prec).all()):
        raise ValueError(f"{path.name}: mean or precision holds NaN or infinity")
    return {"mean": mean, "precision": prec}
