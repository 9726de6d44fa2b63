"""The ``kdviewer`` command: the viewer (default), folder classification, single-case prediction, info.

    kdviewer [gui] [PATH ...] [--model BUNDLE]          open the viewer (the default subcommand)
    kdviewer classify FOLDER [-o results.csv] [...]      batch classification, resumable
    kdviewer predict FILE [--teacher] [--json]           one case (file or CT-series folder)
      (both take --dicom-out DIR: a DICOM Structured Report + Secondary Capture per case)
    kdviewer render CASE -o out.png [--saliency M]       a case rendered to PNG (no window)
    kdviewer info PATH                                   an image/series summary, or a bundle's manifest

Without ``--model`` the bundled real-data model (resources/models/kermany_cxr: paediatric chest
radiographs, pneumonia vs normal) is used. Errors print one line; exit code
2 = usage error, 1 = the command failed, 130 = interrupted. In ``classify``, unreadable files are rows
with an error, not a failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kdviewer import __version__
from kdviewer.errors import KDViewerError
from kdviewer.sanitize import plain

log = logging.getLogger("kdviewer")

SUBCOMMANDS = ("gui", "classify", "predict", "render", "info")
EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    """Bad arguments detected after parsing (exit code 2)."""


def _one_line(msg: object) -> str:
    lines = [ln.strip() for ln in str(msg).splitlines() if ln.strip()]
    if not lines:
        return type(msg).__name__ if isinstance(msg, BaseException) else "unknown error"
    return lines[0] + ((" " + "; ".join(lines[1:])) if len(lines) > 1 else "")


def _bundle_arg(value: str | None) -> Path:
    from kdviewer.models.bundle import default_bundle_path

    return Path(value).expanduser() if value else default_bundle_path()


# ---------------------------------------------------------------------------------------- commands


def cmd_gui(args: argparse.Namespace) -> int:
    from kdviewer.sysdeps import DisplayUnreachable, SystemLibrariesMissing, check_gui_platform

    try:  # before any QApplication exists: Qt aborts the process (exit 134) when its plugin cannot load
        check_gui_platform()
    except (SystemLibrariesMissing, DisplayUnreachable) as exc:
        print(f"kdviewer: {exc}", file=sys.stderr)
        return EXIT_FAIL
    try:
        from kdviewer.gui.app import main_gui
    except ImportError as exc:
        raise KDViewerError(
            f"the viewer is not available in this installation ({exc}); "
            "the command-line tools (classify, predict, info) still work"
        ) from exc
    bundle = Path(args.model).expanduser() if args.model else None
    return int(main_gui([Path(p) for p in args.paths], bundle) or 0)


def cmd_render(args: argparse.Namespace) -> int:
    try:
        from kdviewer.gui.render import render_case
    except ImportError as exc:
        raise KDViewerError(f"rendering needs the viewer package, which is not available ({exc})") from exc
    bundle = Path(args.model).expanduser() if args.model else None  # None: the viewer's default (demo)
    answer: dict[str, str] = {}
    out = render_case(Path(args.case), Path(args.output), bundle, args.teacher, args.saliency, answer=answer,
                      finding=args.finding)
    print(out if out is not None else args.output)
    if answer.get("headline"):  # what the picture says, in words (same trust rules as the viewer)
        detail = f" - {answer['detail']}" if answer.get("detail") else ""
        print(f"{args.case}: {answer['headline']}{detail}")
    return EXIT_OK


def cmd_classify(args: argparse.Namespace) -> int:
    from kdviewer.batch import BatchProgress, default_output, run_batch, summary_lines

    folder = Path(args.folder)
    if not folder.exists():
        raise KDViewerError(f"{folder}: folder not found")
    if not args.output:
        args.output = default_output(folder)
        print(f"results go to {args.output}", file=sys.stderr)
    bundle = _bundle_arg(args.model)
    bar = None
    last = {"done": 0}
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=0, unit="case", dynamic_ncols=True, file=sys.stderr, disable=None)

    def progress(p: BatchProgress) -> None:
        if bar is None:
            return
        if bar.total != p.total:
            bar.total = p.total
            if p.skipped:
                bar.set_description(f"{p.skipped} done earlier")
        bar.update(p.done - last["done"])
        last["done"] = p.done
        if p.errors:
            bar.set_postfix(errors=p.errors, refresh=False)

    cancel = threading.Event()
    exporter = (_DicomExporter(Path(args.dicom_out), _send_target(args), args.finding)
                if args.dicom_out else None)
    try:
        summary = run_batch(
            folder,
            bundle,
            args.output,
            json_out=args.json,
            teacher=args.teacher,
            heatmaps_dir=args.heatmaps,
            workers=args.workers,
            batch_size=args.batch_size,
            threads=args.threads,
            use_int8=args.int8,
            progress=progress,
            cancel=cancel,
            on_result=exporter,
            deidentify=args.deidentify,
            heatmap_target=args.finding,
            cluster=args.cluster,
        )
    finally:
        if bar is not None:
            bar.close()
    for line in summary_lines(summary):
        print(line)
    if exporter is not None:
        print(exporter.summary())
    return EXIT_OK


class _DicomExporter:
    """``classify --dicom-out``: SR + SC per classified case (reloaded here for its pixels and headers)."""

    def __init__(self, out_dir: Path, send: dict[str, Any] | None = None, finding: str | None = None) -> None:
        self.out_dir = out_dir
        self.finding = finding
        self.send = send
        self.sent = 0
        self.written = 0
        self.failed: list[str] = []
        self._model: Any = None

    def __call__(self, clf: Any, case: Any, pred: Any, comp: Any) -> None:
        from kdviewer.batch import load_case
        from kdviewer.dicom_out import ModelIdentity, export_case

        if self._model is None:
            self._model = ModelIdentity.from_bundle(clf.bundle)
        try:
            study = load_case(case)
            done = export_case(study, pred, self.out_dir, model=self._model, comparison=comp,
                               saliency=_explain(clf, study, pred, self.finding), files=list(case.files),
                               case=case.path)
            self.written += 1
            if self.send is not None:
                from kdviewer.dicom_out.send import send_files

                self.sent += send_files([done.sr_path, done.sc_path], **self.send)
        except KDViewerError as exc:
            self.failed.append(case.path)
            log.warning("no DICOM result for %s: %s", case.path, _one_line(exc))

    def summary(self) -> str:
        text = f"DICOM: {self.written} Structured Report(s) + Secondary Capture(s) in {self.out_dir}"
        if self.send is not None:
            text += f"; {self.sent} object(s) stored on {self.send['called_aet']}@{self.send['host']}:" \
                    f"{self.send['port']}"
        if self.failed:
            text += f"; {len(self.failed)} case(s) failed (see the warnings above)"
        return text


def _send_target(args: argparse.Namespace) -> dict[str, Any] | None:
    """``--send HOST:PORT --aet AET [--calling-aet AET]`` as `send_files` keywords (None without --send)."""
    if not getattr(args, "send", None):
        return None
    from kdviewer.dicom_out.send import parse_address

    host, port = parse_address(args.send)
    return {"host": host, "port": port, "called_aet": args.aet, "calling_aet": args.calling_aet}


def _explain(clf: Any, study: Any, pred: Any, finding: str | None = None) -> Any:
    """Grad-CAM of the answer (or of ``finding``) for the Secondary Capture; None (a capture without
    overlay) when it fails."""
    from kdviewer.inference.saliency import explain

    try:
        return explain(clf, study, pred, target=finding)
    except (KDViewerError, ValueError, RuntimeError) as exc:
        log.warning("no saliency overlay for the DICOM capture: %s", _one_line(exc))
        return None


def _load_case(path: Path) -> Any:
    from kdviewer.imaging import load

    return load(path)


def cmd_predict(args: argparse.Namespace) -> int:
    from kdviewer.inference.predict import Classifier

    study = _load_case(Path(args.file))
    clf = Classifier(_bundle_arg(args.model), use_int8=args.int8, threads=args.threads,
                     load_teacher=args.teacher)
    _check_finding(clf.class_names, args.finding)
    frames: Any = None if args.frames == "auto" else args.frames
    comp: Any = None
    if args.teacher:
        comp = clf.compare(study, frames)
        result: dict[str, Any] = comp.to_dict()
        pred = comp.student
    else:
        pred = clf.predict(study, frames)
        result = pred.to_dict()
    result["path"] = str(args.file)
    result["bundle"] = {"name": clf.manifest.name, "demo": clf.bundle.is_demo,
                        "synthetic_data": clf.bundle.is_synthetic}
    dropped = list(study.dropped)
    if study.n_found is not None:
        result["slices_found"] = study.n_found
        result["slices_dropped"] = [{"path": p, "reason": why} for p, why in dropped]
    if args.dicom_out:
        from kdviewer.dicom_out import export_case

        done = export_case(study, pred, Path(args.dicom_out), bundle=clf.bundle,
                           comparison=comp,
                           saliency=_explain(clf, study, pred, args.finding), case=args.file)
        result["dicom"] = {"sr": str(done.sr_path), "sc": str(done.sc_path), "study_uid": done.study_uid}
        target = _send_target(args)
        if target is not None:
            from kdviewer.dicom_out.send import send_files

            result["dicom"]["stored"] = send_files([done.sr_path, done.sc_path], **target)
            result["dicom"]["sent_to"] = f"{target['called_aet']}@{target['host']}:{target['port']}"
    if args.heatmap:
        result["heatmap"] = _save_heatmap(clf, study, pred, args.finding, Path(args.heatmap))
    if args.json:
        print(json.dumps(result, indent=2))
        return EXIT_OK
    tags = [t for t, on in (("DEMO", clf.bundle.is_demo), ("SYNTHETIC", clf.bundle.is_synthetic)) if on]
    shown = f"  [{', '.join(tags)} model]" if tags else ""
    if pred.refused is not None:
        print(plain(f"{args.file}: no answer - {pred.refused}{shown}"))
        print("  refused by the modality gate: the model was not run on this study")
    elif pred.ood_flag:
        # no confident-looking number on the headline: the guard says the answer is not reliable
        print(plain(f"{args.file}: no reliable answer - this image is unlike the training data{shown}"))
        print(f"  OOD score {pred.ood_score:.2f} > threshold {pred.ood_threshold:.2f}")
        print(plain(f"  the model's output anyway (not reliable): {pred.label}"))
        for name, p in zip(pred.class_names, pred.probabilities, strict=True):
            print(f"    {plain(name):<18} {p:.3f}")
    elif pred.task == "multi-label":
        _print_findings(str(args.file), pred, shown)
    else:
        print(plain(f"{args.file}: {pred.label} ({pred.probability:.1%}){shown}"))
        for name, p in zip(pred.class_names, pred.probabilities, strict=True):
            print(f"  {plain(name):<20} {p:.3f}")
    if pred.aggregate and pred.refused is None:
        print(f"  series of {len(pred.frames)} slices, aggregate: {pred.aggregate}")
    if dropped:
        print(f"  WARNING: {len(dropped)} of {study.n_found} slices could not be read and were left out; a "
              "finding on them cannot be seen:")
        for p, why in dropped:
            print(plain(f"    {p}: {why}"))
    if pred.refused is not None:
        print("  decision support only - not a diagnosis")
        _print_dicom_out(args, result)
        return EXIT_OK
    if pred.ood_score is not None and not pred.ood_flag:
        print(f"  OOD score {pred.ood_score:.2f} (threshold {pred.ood_threshold:.2f})")
    if args.teacher:
        c = result
        verdict = "DISAGREE" if c["disagree"] else "agree"
        said = comp.teacher.label if comp.teacher.task == "multi-label" else (
            f"{comp.teacher.label} ({comp.teacher.probability:.1%})")
        print(plain(f"  teacher: {said}; student and teacher {verdict} "
                    f"(TV {c['divergence']:.3f}, threshold {c['threshold']:.2f})"))
    if result.get("heatmap"):
        print(plain(f"  Grad-CAM of {result['heatmap']['finding']}: {result['heatmap']['path']}"))
    calib = f"calibrated, T={pred.temperature:g}" if pred.calibrated else "uncalibrated"
    print(f"  {calib}; {pred.runtime}; {pred.timings.get('total_ms', 0.0):.1f} ms")
    print("  decision support only - not a diagnosis")
    _print_dicom_out(args, result)
    return EXIT_OK


def _check_finding(names: list[str], finding: str | None) -> None:
    if finding is not None and finding not in names:
        raise KDViewerError(f"unknown finding {finding!r}; this model's classes: {', '.join(names)}")


def _save_heatmap(clf: Any, study: Any, pred: Any, finding: str | None, out: Path) -> dict[str, str] | None:
    """``predict --heatmap``: Grad-CAM overlay PNG of the answer (or of ``finding``); None when the model
    gave no answer (refused by the modality gate)."""
    from PIL import Image

    from kdviewer.imaging.windowing import display_frame
    from kdviewer.inference.saliency import explain, overlay

    smap = explain(clf, study, pred, target=finding)
    if smap is None:
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(overlay(display_frame(study, smap.frame), smap.heatmap)).save(out)
    return {"path": str(out), "finding": smap.class_name, "method": smap.method}


def _print_findings(case: str, pred: Any, shown: str) -> None:
    """A multi-label answer: the findings at or above their own thresholds, then one line per finding
    (probability, threshold, ABOVE), the way the viewer's bars show them."""
    n = len(pred.positives)
    what = f"{n} of {len(pred.class_names)} findings at or above their thresholds" if n else pred.label
    print(plain(f"{case}: {', '.join(pred.positives) if n else 'no finding'} ({what}){shown}"))
    thresholds = pred.thresholds or [0.5] * len(pred.class_names)
    print(f"  {'finding':<20} {'p':>5}  {'threshold':>9}")
    for name, p, t in zip(pred.class_names, pred.probabilities, thresholds, strict=True):
        mark = "  ABOVE" if p >= t else ""
        print(plain(f"  {name:<20} {p:.3f}  {t:>9.3f}{mark}"))


def _print_dicom_out(args: argparse.Namespace, result: dict[str, Any]) -> None:
    if args.dicom_out:
        print(f"  DICOM: {result['dicom']['sr']} (SR), {result['dicom']['sc']} (SC)")
        if "sent_to" in result["dicom"]:
            print(f"  stored {result['dicom']['stored']} object(s) on {result['dicom']['sent_to']}")


def _is_bundle(path: Path) -> bool:
    import zipfile

    if path.is_dir():
        return (path / "manifest.json").is_file()
    if path.name == "manifest.json":
        return True
    if path.is_file() and zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                return any(n.endswith("manifest.json") for n in zf.namelist())
        except (OSError, zipfile.BadZipFile):
            return False
    return False


def cmd_info(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if not path.exists():
        raise KDViewerError(f"{path}: not found")
    if _is_bundle(path):
        from kdviewer.models.bundle import open_bundle

        with open_bundle(path) as bundle:
            if args.json:
                print(bundle.manifest.model_dump_json(indent=2))
            else:
                print("\n".join(plain(line) for line in bundle.summary()))
        return EXIT_OK
    study = _load_case(path)
    info: dict[str, Any] = {
        "source": str(study.source or path),
        "modality": study.modality,
        "frames": study.n_frames,
        "size": f"{study.shape[1]} x {study.shape[0]} px",
        "photometric": study.photometric + (" (shown inverted)" if study.invert else ""),
        "pixel_spacing_mm": list(study.pixel_spacing) if study.pixel_spacing else None,
        "slice_spacing_mm": study.slice_spacing,
        "window": f"{study.window.name or 'default'}: C {study.window.center:g} / W {study.window.width:g}",
        "value_range": [float(study.frames.min()), float(study.frames.max())],
        "metadata": dict(study.metadata),
        "uids": dict(study.uids),
        "notes": list(study.notes),
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return EXIT_OK
    # every string printed comes from the file: no escape sequence reaches the terminal
    for key in ("source", "modality", "frames", "size", "photometric", "pixel_spacing_mm", "slice_spacing_mm",
                "window", "value_range"):
        if info[key] is not None:
            print(plain(f"{key}: {info[key]}"))
    for key, value in info["metadata"].items():
        print(plain(f"  {key}: {value}"))
    for key, value in info["uids"].items():
        shown = value if len(value) < 120 else value[:117] + "..."
        print(plain(f"  {key}: {shown}"))
    for note in info["notes"]:
        print(plain(f"note: {note}"))
    return EXIT_OK


# ------------------------------------------------------------------------------------------ parser


def _add_model(p: argparse.ArgumentParser, runtime: bool = True) -> None:
    p.add_argument("--model", "-m", metavar="BUNDLE", help="model bundle folder or .zip (default: the demo)")
    if runtime:
        g = p.add_mutually_exclusive_group()
        g.add_argument("--int8", dest="int8", action="store_const", const=True, default="auto",
                       help="use the INT8 student (default: INT8 when the bundle recommends it)")
        g.add_argument("--fp32", dest="int8", action="store_const", const=False, help="use the fp32 student")
        p.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads (default 2)")


def _add_send(p: argparse.ArgumentParser) -> None:
    p.add_argument("--send", metavar="HOST:PORT",
                   help="C-STORE the --dicom-out objects to a PACS (DICOM node) at HOST:PORT")
    p.add_argument("--aet", default="ANY-SCP",
                   help="the PACS's (called) AE title for --send (default ANY-SCP)")
    p.add_argument("--calling-aet", default="KDVIEWER", help="kdviewer's own AE title (default KDVIEWER)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdviewer",
        description="Chest X-ray / CT viewer with a distilled student classifier. Decision support only.",
    )
    parser.add_argument("--version", action="version", version=f"kdviewer {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("gui", help="open the viewer (default)")
    p.add_argument("paths", nargs="*", metavar="PATH", help="images, DICOM files or series folders to open")
    _add_model(p, runtime=False)
    p.set_defaults(func=cmd_gui)

    p = sub.add_parser("classify", help="classify every image under a folder into a CSV (resumable)")
    p.add_argument("folder", help="folder searched recursively (PNG, JPEG, TIFF, DICOM; CT series grouped)")
    p.add_argument("-o", "--output",
                   help="results CSV (rerun with the same file to resume); default: "
                   "./kdviewer-results/<folder name>-<hash>.csv, outside the folder being classified")
    _add_model(p)
    p.add_argument("--teacher", action="store_true", help="also run the teacher and flag disagreements")
    p.add_argument("--json", metavar="FILE", help="also write JSON (.jsonl: one object per line, as it goes)")
    p.add_argument("--heatmaps", metavar="DIR", help="write a Grad-CAM overlay PNG per case into DIR")
    p.add_argument("--finding", metavar="NAME", default=None,
                   help="the class / finding the heatmaps and DICOM captures explain (default: each "
                   "case's answer; multi-label: the finding furthest above its threshold)")
    p.add_argument("--workers", type=int, default=2, help="decoder processes (0 = decode in-process)")
    p.add_argument("--batch-size", type=int, default=16, help="images per inference batch")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--cluster", metavar="local[:N]|tcp://HOST:8786",
                   help="decode and infer on Dask workers: a local cluster of N processes, or a running "
                        "scheduler whose workers see the same files (pip install 'kdviewer[cluster]')")
    p.add_argument("--dicom-out", metavar="DIR",
                   help="also write a DICOM Structured Report + Secondary Capture per case into DIR")
    _add_send(p)
    p.add_argument("--deidentify", action="store_true",
                   help="write paths relative to FOLDER and replace DICOM UIDs by consistent pseudonyms")
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("predict", help="classify one image, DICOM file or CT-series folder")
    p.add_argument("file")
    _add_model(p)
    p.add_argument("--teacher", action="store_true", help="compare with the teacher")
    p.add_argument("--frames", choices=("auto", "all", "middle"), default="auto",
                   help="which frames: auto = every slice of a CT volume, else the middle one")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--heatmap", metavar="PNG", help="write the Grad-CAM overlay of the answer to PNG")
    p.add_argument("--finding", metavar="NAME", default=None,
                   help="the class / finding --heatmap and --dicom-out explain (default: the answer; "
                   "multi-label: the finding furthest above its threshold)")
    p.add_argument("--dicom-out", metavar="DIR",
                   help="also write a DICOM Structured Report + Secondary Capture of the result into DIR")
    _add_send(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("render", help="render a case (with prediction and saliency) to a PNG")
    p.add_argument("case")
    p.add_argument("-o", "--output", required=True)
    _add_model(p, runtime=False)
    p.add_argument("--teacher", action="store_true")
    p.add_argument("--saliency", metavar="METHOD", default=None,
                   help="gradcam, gradcam++, scorecam, eigencam, layercam or hirescam")
    p.add_argument("--finding", metavar="NAME", default=None,
                   help="the class / finding the saliency map explains (default: the answer)")
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("info", help="summary of an image / series (safe tags only) or of a model bundle")
    p.add_argument("path")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)
    return parser


def _with_default_command(argv: list[str]) -> list[str]:
    """Insert "gui" unless a subcommand (or top-level -h/--version) is given."""
    for i, arg in enumerate(argv):
        if arg in SUBCOMMANDS:
            return argv
        if arg in ("-h", "--help", "--version"):
            return argv
        if arg in ("-v", "--verbose"):
            continue
        return [*argv[:i], "gui", *argv[i:]]
    return [*argv, "gui"]


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(_with_default_command(args_list))
    except SystemExit as exc:  # argparse: --help / --version exit 0, usage errors exit 2
        return int(exc.code or 0)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if args.command == "classify" and (args.workers < 0 or args.batch_size < 1):
        print("kdviewer: error: --workers must be >= 0 and --batch-size >= 1", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "classify" and args.cluster and args.dicom_out:
        print("kdviewer: error: --dicom-out cannot be combined with --cluster (yet); run it without "
              "--cluster", file=sys.stderr)
        return EXIT_USAGE
    if getattr(args, "send", None):
        from kdviewer.dicom_out.send import parse_address

        try:
            parse_address(args.send)
            if not args.dicom_out:
                raise ValueError("--send needs --dicom-out DIR (the objects are written there, then sent)")
        except ValueError as exc:
            print(f"kdviewer: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
    if getattr(args, "threads", 1) < 1:
        print("kdviewer: error: --threads must be >= 1", file=sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.func(args))
    except BrokenPipeError:  # `kdviewer info ... | head`: the reader went away; not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt:
        print("kdviewer: interrupted" + ("; rerun the same command to resume" if args.command == "classify"
                                         else ""), file=sys.stderr)
        return EXIT_INTERRUPTED
    except KDViewerError as exc:
        print(plain(f"kdviewer: error: {_one_line(exc)}"), file=sys.stderr)
        return EXIT_FAIL
    except OSError as exc:
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        print(f"kdviewer: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAIL


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
