"""``kd-train`` / ``python -m training``: the command line of the distillation engine.

Sub-commands::

    kd-train run CONFIG [--events -|FILE] [--resume] [--set key.path=value ...] [--variant NAME]
    kd-train export RUN_DIR [--events -|FILE] [--set output.key=value ...]
                                         rebuild a run's bundle from its best checkpoint (no training)
    kd-train check CONFIG [--json] [--set ...] [--variant NAME]
    kd-train recipes                     list the packaged recipes (CONFIG may be a recipe name, e.g. 002)
    kd-train synth ...                   synthetic phantoms (training.synth)
    kd-train eval BUNDLE DATA ...        metrics of a bundle on a dataset (training.evaluate)
    kd-train report BUNDLE ...           HTML report (training.report)
    kd-train prune ...                   L1 structured pruning + fine-tune (training.prune)

``run`` writes JSON-lines events (`kdviewer.events`) to stdout with ``--events -`` (what the training
panel reads) or to FILE, and always to ``<output.dir>/events.jsonl``. Without ``--events -``, a human
summary is printed and a progress bar is shown when stderr is a terminal.

Exit codes: 0 finished; 1 crashed (an ``error`` event carries the traceback, the last checkpoint
stays usable with ``--resume``); 2 invalid configuration (``check --json`` lists ``{loc, msg}``);
3 stopped by the user (SIGINT/SIGTERM or a ``STOP`` file in the output folder) after a checkpoint was
written — ``run --resume`` continues exactly from there.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_CRASH, EXIT_CONFIG, EXIT_STOPPED = 0, 1, 2, 3

# Sub-commands owned by other modules: (module, what it does). Registered through their add_cli.
_PLUGINS = (
    ("training.synth", "synth", "generate synthetic phantoms"),
    ("training.evaluate", "eval", "evaluate a bundle on a dataset"),
    ("training.report", "report", "write a bundle's HTML report"),
    ("training.prune", "prune", "L1 structured pruning + fine-tuning of a bundle's student"),
    ("training.ablate", "ablate", "KD ablation of a recipe: no KD vs each method, over seeds, one table"),
)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="run file (YAML) or a packaged recipe name such as 002")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting, e.g. --set optim.lr=0.01 --set data.root=/data/cxr (repeatable)",
    )
    p.add_argument("--variant", default=None, help="apply one of the recipe's named variants")


def _unavailable(module: str, name: str, error: BaseException) -> Any:
    def handler(_args: argparse.Namespace) -> int:
        print(f"kd-train {name}: not available ({module} could not be imported: {error})", file=sys.stderr)
        return EXIT_CRASH

    return handler


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kd-train",
        description="Knowledge-distillation training engine of kdviewer.",
        epilog="Exit codes: 0 ok, 1 crash, 2 configuration error, 3 stopped by the user (resumable).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("run", help="train teacher/student and export a bundle")
    _add_config_args(p)
    p.add_argument(
        "--events",
        default=None,
        metavar="-|FILE",
        help="write JSON-lines events to stdout (-) or FILE (also always to <output.dir>/events.jsonl)",
    )
    p.add_argument("--resume", action="store_true", help="continue from <output.dir>/checkpoints/last.pt")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "export", help="write a run's bundle again from its best checkpoint, without training"
    )
    p.add_argument("run_dir", help="the run's output folder (holds config.yaml and checkpoints/)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="output.KEY=VALUE",
        help="change how the bundle is written, e.g. --set output.int8_fp32_through=blocks.7 "
        "(output.* settings only: the checkpoints were trained with the run's own config)",
    )
    p.add_argument(
        "--events",
        default=None,
        metavar="-|FILE",
        help="write JSON-lines events to stdout (-) or FILE (also always to RUN_DIR/events.jsonl)",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("check", help="validate a run file; prints the problems per field")
    _add_config_args(p)
    p.add_argument("--json", action="store_true", help="print a JSON list of {loc, msg}")
    p.add_argument("--data", action="store_true",
                   help="also find the images and classes as `run` does (JSON: {ok, errors, data})")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("recipes", help="list the packaged recipes")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_recipes)

    wanted = next((a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("-")), None)
    for module, name, helptext in _PLUGINS:
        if name != wanted:  # import a plugin only when its command runs (some import heavy modules)
            q = sub.add_parser(name, help=helptext, add_help=False)
            q.add_argument("rest", nargs=argparse.REMAINDER)
            q.set_defaults(func=_unavailable(module, name, RuntimeError("not loaded")))
            continue
        try:
            mod = importlib.import_module(module)
            add = mod.add_cli
        except (ImportError, AttributeError) as exc:
            q = sub.add_parser(name, help=f"{helptext} (unavailable)", add_help=False)
            q.add_argument("rest", nargs=argparse.REMAINDER)
            q.set_defaults(func=_unavailable(module, name, exc))
            continue
        add(sub)
    return parser


# ----------------------------------------------------------------------------------------- commands


def cmd_check(args: argparse.Namespace) -> int:
    from training.config import validate, validate_with_data

    if args.data:
        issues, summary = validate_with_data(args.config, args.overrides, args.variant)
        if args.json:
            print(json.dumps({"ok": not issues, "errors": issues, "data": summary}, default=str))
            return EXIT_CONFIG if issues else EXIT_OK
        if summary.get("classes"):
            c = summary["counts"]
            print(f"data: classes {', '.join(summary['classes'])}; {c['train']} train / {c['val']} val / "
                  f"{c['test']} test images")
        elif summary.get("labels_found"):
            print("labels found: " + ", ".join(f"{k} ({v})" for k, v in summary["labels_found"].items()))
    else:
        issues = validate(args.config, args.overrides, args.variant)
    if args.json:
        print(json.dumps(issues, indent=None))
    elif issues:
        for issue in issues:
            print(f"{issue['loc'] or '(file)'}: {issue['msg']}")
    else:
        print(f"{args.config}: OK")
    return EXIT_CONFIG if issues else EXIT_OK


def cmd_recipes(args: argparse.Namespace) -> int:
    import yaml

    from training.config import list_recipes

    rows = []
    for path in list_recipes():
        try:
            desc = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("description", "")
        except Exception:  # a broken recipe still gets listed
            desc = ""
        rows.append({"name": path.stem, "path": str(path), "description": desc})
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(f"{r['name']:<32} {r['description']}")
    return EXIT_OK


class _HumanSink:
    """Turns events into short lines on stderr when no --events - stream is requested."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, line: str) -> None:
        from kdviewer.events import parse_event

        ev = parse_event(line)
        if ev is None:
            return
        kind = ev["event"]
        text = None
        if kind == "run_start":
            d = ev.get("dataset", {})
            text = (
                f"run {ev['run_id']} on {ev.get('device')} (amp {ev.get('amp')}), "
                f"{d.get('train')} train / {d.get('val')} val / {d.get('test')} test, "
                f"stages {ev.get('stages')}"
            )
        elif kind == "stage_start" and ev.get("substages"):
            text = f"stage {ev['stage']}: {', '.join(ev['substages'])}"
        elif kind == "stage_start":
            text = f"stage {ev['stage']}: {ev['epochs']} epochs x {ev['steps_per_epoch']} steps"
        elif kind == "progress":
            text = (
                f"{ev.get('stage')} {ev.get('index')}/{ev.get('total')}: {ev.get('substage')} "
                f"({ev.get('elapsed_s', 0):.1f} s)"
            )
        elif kind == "stage_end":
            timings = ev.get("timings") or {}
            text = f"stage {ev.get('stage')} done in {ev.get('elapsed_s', 0):.1f} s" + (
                " (" + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()) + ")" if timings else ""
            )
        elif kind == "epoch_end":
            v, t = ev.get("val", {}), ev.get("train", {})

            def f(x: Any) -> str:
                return "n/a" if x is None else f"{x:.4f}"

            text = (
                f"{ev['stage']} epoch {ev['epoch']}: train loss {f(t.get('loss'))}, "
                f"val loss {f(v.get('loss'))}, acc {f(v.get('accuracy'))}, auc {f(v.get('auc'))}"
                f"{'  *best*' if ev.get('best') else ''} ({ev.get('epoch_time_s', 0):.1f} s)"
            )
        elif kind == "stopped":
            text = f"stopped during {ev.get('stage')}; checkpoint {ev.get('checkpoint')}"
        elif kind == "error":
            text = f"{kind}: {ev.get('message') or ev.get('checkpoint')}"
        elif kind == "run_end":
            text = f"done in {ev.get('elapsed_s', 0):.0f} s; bundle: {ev.get('bundle')}"
        elif kind == "log":
            text = f"[{ev.get('level')}] {ev.get('message')}"
        if text:
            self.stream.write(text + "\n")
            self.stream.flush()

    def flush(self) -> None:
        self.stream.flush()

    def close(self) -> None:
        """The wrapped stream (stderr) stays open."""


def cmd_run(args: argparse.Namespace) -> int:
    from training.config import ConfigError, check_environment, load_config

    try:
        cfg = load_config(args.config, args.overrides, args.variant)
        issues = check_environment(cfg)
        if issues:
            raise ConfigError(issues, str(args.config))
    except ConfigError as exc:
        return _config_failed(exc, args.events)
    return _run_engine(cfg, args.events, resume=args.resume)


def cmd_export(args: argparse.Namespace) -> int:
    """``kd-train export RUN_DIR``: the run's own config.yaml, its checkpoints, a new bundle."""
    from training.config import ConfigError, load_config

    run_dir = Path(args.run_dir)
    try:
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(
                [{"loc": "run_dir", "msg": f"{run_dir} is not a run folder (no config.yaml)"}], str(run_dir)
            )
        wrong = [o for o in args.overrides if not o.startswith("output.") or o.startswith("output.dir=")]
        if wrong:
            raise ConfigError(
                [{"loc": o.split("=", 1)[0], "msg": "export takes output.* settings only (not output.dir)"}
                 for o in wrong],
                str(run_dir),
            )
        cfg = load_config(run_dir / "config.yaml", args.overrides)
        out = cfg.output.model_copy(update={"dir": run_dir, "export": True})
        cfg = cfg.model_copy(update={"output": out})
    except ConfigError as exc:
        return _config_failed(exc, args.events)
    return _run_engine(cfg, args.events, export_only=True)


def _config_failed(exc: Exception, events_target: str | None) -> int:
    from kdviewer.events import EventWriter
    from training.distributed import env_rank

    if events_target == "-" and env_rank() == 0:
        writer = EventWriter("config", [sys.stdout])
        writer.emit(
            "error",
            message=str(exc),
            type="ConfigError",
            traceback="",
            checkpoint=None,
            errors=getattr(exc, "errors", []),
        )
    print(str(exc), file=sys.stderr)
    return EXIT_CONFIG


def _run_engine(cfg: Any, events_target: str | None, resume: bool = False, export_only: bool = False) -> int:
    from kdviewer.events import EventWriter
    from training.config import ConfigError
    from training.distributed import env_rank
    from training.engine import run

    main_rank = env_rank() == 0
    run_id = f"{cfg.output.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    if main_rank:
        events = EventWriter.open(run_id, events_target, log_file=Path(cfg.output.dir) / "events.jsonl")
        if events_target != "-":
            events.sinks.append(_HumanSink(sys.stderr))  # type: ignore[arg-type]
    else:
        events = EventWriter(run_id, [])
    try:
        result = run(cfg, events, resume=resume, export_only=export_only)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        print("aborted", file=sys.stderr)
        return EXIT_CRASH
    except Exception as exc:  # the engine already emitted an `error` event with the traceback
        print(f"kd-train run failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_CRASH
    finally:
        events.close()
    return EXIT_STOPPED if result.status == "stopped" else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    code = int(args.func(args) or 0)
    if code == EXIT_STOPPED and argv is None:  # the process itself (kd-train / python -m training)
        # A stop must end the process within seconds. After a stop during the export, the interpreter's
        # teardown was seen to block for minutes in a native destructor (garbage collection at exit);
        # everything is written and flushed by now, so leave without it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
