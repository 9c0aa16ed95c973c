"""The ``fcclip`` command: one subcommand per module.

    fcclip predict IMAGE... --vocab VOCAB --out DIR [--model PRESET] [--weights W]
    fcclip label SOURCE --out DEST --vocab VOCAB [--embeddings] [...]
    fcclip relabel DEST --vocab NEW --out DEST2 | fcclip search DEST TEXT | fcclip embed-text TEXT
    fcclip review pick | push | pull | merge   (people in the loop, with Label Studio)
    fcclip train --config NAME_OR_YAML --data ROOT --storage URI [...]
    fcclip eval | show | export | submit | metrics | synth ...
    fcclip models | fcclip vocabularies
    fcclip --version

Every subcommand is a module with two functions, ``add_arguments(parser)`` (fills the subcommand's
``argparse`` parser) and ``main_args(args) -> int`` (runs it; the exit status). It reports a user's mistake itself,
on stderr, and returns 2. :data:`COMMANDS` names the module of each, its help line and the packages of the Ray extra
it needs; a new subcommand is one more entry there.

Only the module of the subcommand being run is imported, so ``fcclip --help`` and ``fcclip models`` do not load
PyTorch, and nothing but ``label``, ``train``, ``eval`` and ``submit`` loads Ray.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import logging
import os
import signal
import sys
import threading
import warnings
from typing import Iterable, NamedTuple, Sequence

import fcclip

from . import runtime


class Command(NamedTuple):
    module: str  # defines add_arguments(parser) and main_args(args) -> int
    help: str  # one line, for `fcclip --help`
    needs: tuple[str, ...] = ()  # packages of the `ray` extra it runs on


RAY_EXTRA = ("ray",)

COMMANDS: dict[str, Command] = {
    "predict": Command("fcclip_pipelines.predict", "segment images; write COCO panoptic PNG + JSON and an overlay per image"),
    "label": Command("fcclip_pipelines.label", "label an image collection on Ray: Parquet with COCO RLE masks", RAY_EXTRA),
    "show": Command("fcclip_pipelines.show", "an HTML report of a labeling output: counts, classes, scores, errors, "
                    "overlays", ("duckdb",)),
    "export": Command("fcclip_pipelines.export", "a labeling output as COCO panoptic / instances / semantic files"),
    "relabel": Command("fcclip_pipelines.relabel", "a labeling output under a new vocabulary, from its stored embeddings",
                       RAY_EXTRA),
    "search": Command("fcclip_pipelines.search", "segments of a labeling output ranked by similarity to a text",
                      ("duckdb",)),
    "review": Command("fcclip_pipelines.review", "pick the labels most likely wrong, review them in Label Studio, "
                      "pull the corrections back"),
    "embed-text": Command("fcclip_pipelines.embed_text", "a text's CLIP embedding as JSON (for SQL search)"),
    "train": Command("fcclip_pipelines.train_cli", "train FC-CLIP with Ray Train", RAY_EXTRA),
    "eval": Command("fcclip_pipelines.evaluate", "zero-shot benchmark evaluation (PQ, AP, mIoU) on Ray", RAY_EXTRA),
    "metrics": Command("fcclip.metrics.cli", "evaluate predictions on disk: panoptic PQ, semantic mIoU"),
    "submit": Command("fcclip_pipelines.submit", "run an fcclip command on a Ray cluster via the Job API and follow it",
                      ("ray",)),
    "synth": Command("fcclip_pipelines.synth", "generate synthetic data: images, or a COCO-panoptic-layout dataset"),
    "models": Command("fcclip_pipelines.models", "list the model presets"),
    "vocabularies": Command("fcclip_pipelines.vocabularies", "list the builtin vocabularies"),
}

# third-party packages that only the `ray` extra installs
_EXTRA_PACKAGES = {"ray", "duckdb", "s3fs", "botocore", "pandas", "tqdm"}


class MissingExtra(ImportError):
    """A subcommand needs a package of the ``fcclip[ray]`` extra that is not installed."""


def load_command(name: str):
    """The module of subcommand ``name``; MissingExtra when it needs the Ray extra and that is not installed."""
    command = COMMANDS[name]
    missing = [p for p in command.needs if importlib.util.find_spec(p) is None]
    if not missing:
        try:
            return importlib.import_module(command.module)
        except ModuleNotFoundError as e:  # a package of the extra that `needs` does not list
            if (e.name or "").split(".")[0] not in _EXTRA_PACKAGES:
                raise
            missing = [e.name]
    raise MissingExtra(f"fcclip {name} needs the Ray extra: pip install 'fcclip[ray]' (missing: {', '.join(missing)})")


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The ``fcclip`` parser. Only the modules of ``commands`` (default: all) are imported and their subcommands'
    arguments filled in; the others are listed by name and help."""
    commands = set(COMMANDS if commands is None else commands)
    parser = argparse.ArgumentParser(prog="fcclip", description="FC-CLIP open-vocabulary panoptic segmentation")
    parser.add_argument("--version", action="version", version=f"fcclip {fcclip.__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help)
        if name in commands:
            load_command(name).add_arguments(p)
    return parser


def _command_in(argv: Sequence[str]) -> str | None:
    """The subcommand named in ``argv``: its first word that is not an option (the top-level options take no
    value)."""
    for word in argv:
        if not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {' '.join(str(message).split())}\n"


def _unrecognized(parser: argparse.ArgumentParser, args: argparse.Namespace, unknown: list[str]) -> None:
    """Exit 2 with the usage of the (sub)command that was given ``unknown`` words, the closest option named
    (``--bacth-size`` -> did you mean --batch-size?)."""
    import difflib

    while True:  # down to the innermost subcommand given: `fcclip review push ...`
        subs = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        if subs is None or getattr(args, subs.dest, None) not in subs.choices:
            break
        parser = subs.choices[getattr(args, subs.dest)]
    options = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
    close = [m for word in unknown if word.startswith("--")
             for m in difflib.get_close_matches(word.split("=", 1)[0], options, n=1)]
    hint = f" (did you mean {' / '.join(dict.fromkeys(close))}?)" if close else ""
    parser.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _command_in(argv)
    try:
        parser = build_parser([command] if command else [])
    except MissingExtra as e:
        print(f"fcclip: error: {e}", file=sys.stderr)
        return 2
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # argparse's own message would come from the top level: `fcclip [-h] ... COMMAND ...`
        _unrecognized(parser, args, unknown)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    if not args.verbose:  # object-store clients log every endpoint lookup at INFO
        for name in ("botocore", "aiobotocore", "s3fs", "gcsfs", "urllib3", "torch"):  # torch: cache stats at exit
            logging.getLogger(name).setLevel(logging.WARNING)
        logging.getLogger("gcsfs").addFilter(_without_traceback)  # its retries' tracebacks: -v shows them
    warnings.simplefilter("default", UserWarning)
    format_warning = warnings.formatwarning
    if not args.verbose:  # one line a warning ("warning: fcclip-tiny: random weights; ..."), not its source line
        warnings.formatwarning = _one_line_warning
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    previous = signal.getsignal(signal.SIGTERM)
    try:
        runtime.raise_on_sigterm()  # set again once Ray has started (runtime.init_ray): Ray sets its own
        return int(load_command(args.command).main_args(args) or 0)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: what a command commits as it goes stays; no traceback unless -v
        if args.verbose:
            raise
        if runtime.terminated():  # Terminated, or what Ray made of it inside one of its calls
            print(f"fcclip {args.command}: stopped by SIGTERM", file=sys.stderr)
            return 128 + signal.SIGTERM
        print(f"fcclip {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of stdout went away (`fcclip models | head -2`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes stdout
        return 1
    except runtime.RayUnreachable as e:  # any command given --address: before anything ran
        print(f"fcclip {args.command}: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        if unusable_protocol(e) and not args.verbose:
            # a URI whose protocol is unknown, or needs a package that is not installed (gs:// without gcsfs)
            extra = _FILESYSTEM_EXTRAS.get(getattr(e.__cause__, "name", None) or "", "")
            print(f"fcclip {args.command}: error: {_first_line(e)}{extra}", file=sys.stderr)
            return 2
        if not storage_error(e) or args.verbose:
            raise
        # an object store or file system that cannot be reached or refuses us: the user's setup, not a bug
        cause = getattr(e, "cause", None) or e  # a Ray task's error: what the task raised
        print(f"fcclip {args.command}: error: storage: {type(cause).__name__}: {_first_line(cause)} "
              "(-v for the traceback)", file=sys.stderr)
        return 1
    finally:
        warnings.formatwarning = format_warning
        if previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)  # a caller's own (main() called in a test, a notebook)


def run() -> None:
    """The ``fcclip`` program (its console script, ``python -m fcclip_pipelines``): :func:`main`, then exit without
    Python's last garbage collections over every object the command loaded (Ray, PyTorch, Arrow: 0.4-0.5 s after a
    label run, for nothing, since the process ends). ``gc.freeze`` moves them out of the collector's reach; reference
    counting and ``atexit`` still run as usual. Not in :func:`main`: a caller that goes on (a test, a notebook)
    keeps its collector."""
    status = main()
    gc.freeze()
    sys.exit(status)


# the packages whose exceptions mean "the storage said no" (endpoint unreachable, access denied, throttled)
_STORAGE_MODULES = ("botocore", "aiobotocore", "s3fs", "gcsfs", "google", "aiohttp", "fsspec", "adlfs", "azure")


def _without_traceback(record: logging.LogRecord) -> bool:
    record.exc_info = record.exc_text = None
    return True


_FILESYSTEM_EXTRAS = {"gcsfs": ' (pip install "fcclip[gcs]" installs it)'}


def unusable_protocol(e: BaseException) -> bool:
    """True for fsspec's "Protocol not known: X" and "install X to access Y" (the file system of a URI's protocol
    is not installed): errors that fsspec's registry raises."""
    if not isinstance(e, (ImportError, ValueError)):
        return False
    tb = e.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.endswith(os.path.join("fsspec", "registry.py")):
            return True
        tb = tb.tb_next
    return False


def storage_error(e: BaseException) -> bool:
    """True for an error that comes from reaching storage: an OSError (connection refused, permission denied)
    or an exception of an object-store client."""
    for err in (e, e.__cause__):
        if isinstance(err, OSError) or (err is not None and type(err).__module__.split(".")[0] in _STORAGE_MODULES):
            return True
    return False


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:300] if lines else ""


if __name__ == "__main__":
    sys.exit(main())
