"""The ``portable-lora`` command line: a thin layer over :mod:`portable_lora.ops`.

Exit codes: 0 success; 1 a check found a difference (``verify``, ``check``, ``demo``,
``convert --verify``); 2 bad input or usage, reported on one line
``portable-lora: error: <file> [<key>]: <detail>`` (``--<option>: <detail>`` for a bad
command-line value); 3 an internal error (a bug); 130 interrupted. ``--debug`` prints the
traceback before that line and changes no exit code.

Run ``portable-lora --help`` or see docs/CLI.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from typing import Any, Callable, Mapping, Sequence

from ._version import __version__
from .core import RULES
from .io.atomic import durable_writes
from .errors import LoraError
from .formats import FORMATS

__all__ = ["main", "build_parser"]

PROG = "portable-lora"
EXIT_OK, EXIT_DIFFERS, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3


def _option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE read as JSON where it parses (numbers, true, lists), else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, found {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def _rank(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, found {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, found {value}")
    return value


def _common() -> argparse.ArgumentParser:
    # SUPPRESS: given after the subcommand it sets the flag, absent it leaves the main parser's value
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the traceback of an error")
    p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                   help="no progress bars (they are shown only when stderr is a terminal)")
    p.add_argument("--durable", action="store_true", default=argparse.SUPPRESS,
                   help="fsync what is written, so it survives a power cut (slower; also "
                        "PORTABLE_LORA_DURABLE=1)")
    return p


def _add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the report as JSON (stable field names)")


def _add_load(p: argparse.ArgumentParser, *, format_flag: str = "--format") -> None:
    p.add_argument(format_flag, dest="format", choices=list(FORMATS), metavar="FORMAT",
                   help=f"the adapter's format (default: detected); one of {', '.join(FORMATS)}")
    p.add_argument("--convention", choices=RULES, metavar="RULE",
                   help=f"what the file's alpha means ({', '.join(RULES)}): needed where the file "
                        "cannot say; overrides a rule the file states")
    p.add_argument("--load-option", action="append", type=_option, default=[], metavar="KEY=VALUE",
                   help="an option for the format's loader (VALUE as JSON where it parses); repeatable")


def _add_save(p: argparse.ArgumentParser) -> None:
    p.add_argument("--save-option", action="append", type=_option, default=[], metavar="KEY=VALUE",
                   help="an option for the format's writer (VALUE as JSON where it parses); repeatable")
    p.add_argument("--force", action="store_true", help="overwrite the output if it exists")


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(
        prog=PROG, description="LoRA adapters that mean the same thing in every framework and format.",
        epilog="Exit codes: 0 ok, 1 a check found a difference, 2 bad input or usage, 3 internal error.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--durable", action="store_true",
                        help="fsync every file written (survives a power cut; slower)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("inspect", parents=[common], help="describe an adapter (and its strength on a base)",
                       description="Format and why, modules, ranks, alphas, rules and scales, dtype, "
                       "provenance. With --base: ‖ΔW‖/‖W‖ per module under every scaling rule.")
    p.add_argument("path", metavar="PATH", help="an adapter in any supported format")
    p.add_argument("--base", metavar="CHECKPOINT",
                   help="base weights: a .safetensors file or a sharded checkpoint directory")
    p.add_argument("-v", "--verbose", action="store_true", help="with --base, list every module's ratios")
    _add_load(p)
    _add_json(p)
    p.set_defaults(run=_inspect)

    p = sub.add_parser("convert", parents=[common], help="convert an adapter to another format",
                       description="Read SRC (any format) and write DST in FORMAT, atomically.")
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST")
    p.add_argument("--to", required=True, choices=list(FORMATS), metavar="FORMAT",
                   help=f"the output format: {', '.join(FORMATS)}")
    p.add_argument("--from", dest="format", choices=list(FORMATS), metavar="FORMAT",
                   help="the input format (default: detected)")
    p.add_argument("--convention", choices=RULES, metavar="RULE",
                   help=f"what the source's alpha means where it cannot say: {', '.join(RULES)}")
    p.add_argument("--modules-from", metavar="CHECKPOINT",
                   help="a base checkpoint whose <module>.weight keys give the module names "
                   "(kohya names need them to restore dots)")
    p.add_argument("--strip-prefix", metavar="PREFIX",
                   help="remove PREFIX from every module name (each name must start with it)")
    p.add_argument("--add-prefix", metavar="PREFIX",
                   help="put PREFIX before every module name (after --strip-prefix), e.g. "
                   "'language_model.' for mlx-vlm or 'text_encoder.' for kohya/diffusers")
    p.add_argument("--verify", action="store_true", help="read DST back and compare ΔW with SRC (exit 1 if it differs)")
    p.add_argument("--load-option", action="append", type=_option, default=[], metavar="KEY=VALUE",
                   help="an option for the source format's loader; repeatable")
    _add_save(p)
    _add_json(p)
    p.set_defaults(run=_convert)

    p = sub.add_parser("merge", parents=[common], help="merge an adapter into base weights (streaming)",
                       description="Write BASE + ΔW to OUT tensor by tensor from memory-mapped files, "
                       "keeping the base's sharding and index.")
    p.add_argument("base", metavar="BASE", help="a .safetensors file or a sharded checkpoint directory")
    p.add_argument("adapter", metavar="ADAPTER")
    p.add_argument("out", metavar="OUT")
    p.add_argument("--strength", type=float, default=1.0, help="multiplies every module's scale (default 1)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="cast every floating-point output tensor (default: keep each tensor's dtype)")
    p.add_argument("--unmerge", action="store_true", help="subtract the adapter instead (not for DoRA)")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="merge even if a factor has NaN/Inf or the result overflows (refused by default)")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.add_argument("--threads", type=_rank, metavar="N",
                   help="worker threads for the row blocks (default: the usable cores, at most 8)")
    _add_load(p)
    _add_json(p)
    p.set_defaults(run=_merge)

    p = sub.add_parser("extract", parents=[common], help="extract a LoRA from tuned − base by SVD",
                       description="A rank-R LoRA of every 2-D / 4-D weight that differs; 1-D tensors "
                       "and unchanged ones are skipped and reported.")
    p.add_argument("base", metavar="BASE")
    p.add_argument("tuned", metavar="TUNED")
    p.add_argument("out", metavar="OUT")
    p.add_argument("--rank", type=_rank, required=True, metavar="R")
    p.add_argument("--to", default="portable", choices=list(FORMATS), metavar="FORMAT",
                   help="the output format (default portable)")
    p.add_argument("--modules", metavar="REGEX", help="only modules whose name matches (re.search)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"],
                   help="the factors' dtype (default float32)")
    _add_save(p)
    _add_json(p)
    p.set_defaults(run=_extract)

    p = sub.add_parser("resize", parents=[common], help="lower an adapter's rank (truncated SVD)",
                       description="Every module above rank R becomes the best rank-R approximation "
                       "of its ΔW, with its scale folded in (alpha = R, rule alpha/rank).")
    p.add_argument("adapter", metavar="ADAPTER")
    p.add_argument("out", metavar="OUT")
    p.add_argument("--rank", type=_rank, required=True, metavar="R")
    p.add_argument("--to", choices=list(FORMATS), metavar="FORMAT",
                   help="the output format (default: the source's)")
    _add_load(p)
    _add_save(p)
    _add_json(p)
    p.set_defaults(run=_resize)

    p = sub.add_parser("verify", parents=[common], help="compare two adapters' ΔW (exit 1 if they differ)",
                       description="ΔW module by module in float64. A module matches when "
                       "max|ΔW_a − ΔW_b| <= atol + rtol · max|ΔW|; rtol defaults by the lower "
                       "factor dtype (float32 1e-5, float16 2e-3, bfloat16 1e-2, float64 1e-10).")
    p.add_argument("a", metavar="A")
    p.add_argument("b", metavar="B")
    p.add_argument("--atol", type=float, help="absolute tolerance (default 0)")
    p.add_argument("--rtol", type=float, help="tolerance relative to the module's max|ΔW| (default: by dtype)")
    p.add_argument("--format-a", choices=list(FORMATS), metavar="FORMAT")
    p.add_argument("--format-b", choices=list(FORMATS), metavar="FORMAT")
    p.add_argument("--convention-a", choices=RULES, metavar="RULE")
    p.add_argument("--convention-b", choices=RULES, metavar="RULE")
    p.add_argument("--modules-from", metavar="CHECKPOINT",
                   help="a base checkpoint giving module names to loaders that need them (kohya)")
    p.add_argument("-v", "--verbose", action="store_true", help="list every module, not only those that differ")
    _add_json(p)
    p.set_defaults(run=_verify)

    p = sub.add_parser("check", parents=[common], help="the same numbers on every installed backend",
                       description="Forward and merge on NumPy, array_api_strict, PyTorch, JAX and MLX "
                       "(those installed) against a float64 NumPy reference.")
    p.add_argument("adapter", metavar="ADAPTER", nargs="?",
                   help="an adapter file (default: a built-in example with DoRA, embedding and conv)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated (default float32,bfloat16)")
    p.add_argument("--backends", help="comma-separated subset (default: every installed backend)")
    p.add_argument("--base", metavar="CHECKPOINT", help="take the base weights from a checkpoint")
    _add_load(p)
    _add_json(p)
    p.set_defaults(run=_check)

    p = sub.add_parser("demo", parents=[common], help="the whole job on a small built-in example",
                       description="Builds a tiny Llama base and a PEFT adapter, inspects it, converts "
                       "it to every format, verifies each, checks every backend.")
    p.add_argument("--out", metavar="DIR", help="keep the files in DIR (default: a deleted temporary directory)")
    p.add_argument("--backends", help="comma-separated subset of backends to check")
    _add_json(p)
    p.set_defaults(run=_demo)
    return parser


# -- subcommands ------------------------------------------------------------------------------

def _progress(args: argparse.Namespace) -> bool:
    from .ops._util import default_progress

    return not args.quiet and default_progress()


def _emit(args: argparse.Namespace, report: Any, text: Callable[[], str] | None = None) -> None:
    from .ops._util import dumps

    if getattr(args, "json", False):
        print(dumps(report))
    else:
        print(text() if text is not None else report.table())


def _modules_from(path: str | None) -> list[str] | None:
    if path is None:
        return None
    from .ops import Checkpoint

    with Checkpoint(path) as ckpt:
        return ckpt.module_names()


def _check_load_options(path: Any, format: str | None, options: Mapping[str, Any]) -> None:
    """Refuse --load-option names the adapter's reader does not take, listing those it does
    (the format detected when --format is not given; detection errors are left to the command)."""
    if not options or path is None:
        return
    from .formats import detect
    from .ops._util import check_format_options

    if format is None:
        try:
            format, _ = detect(path)
        except LoraError:
            return  # the command reports it, as it would without options
    check_format_options(format, "load", options, file=path)


def _inspect(args: argparse.Namespace) -> int:
    from . import ops

    _check_load_options(args.path, args.format, dict(args.load_option))
    report = ops.inspect(args.path, format=args.format, convention=args.convention, base=args.base,
                         options=dict(args.load_option))
    _emit(args, report, lambda: report.table(verbose=args.verbose))
    return EXIT_OK


def _convert(args: argparse.Namespace) -> int:
    from . import ops
    from .ops._util import check_format_options

    check_format_options(args.to, "save", dict(args.save_option), file=args.dst)
    _check_load_options(args.src, args.format, dict(args.load_option))
    report = ops.convert(args.src, args.dst, to=args.to, from_format=args.format, convention=args.convention,
                         modules_from=args.modules_from, force=args.force, check=args.verify,
                         load_options=dict(args.load_option), save_options=dict(args.save_option),
                         strip_prefix=args.strip_prefix, add_prefix=args.add_prefix)
    _emit(args, report)
    return EXIT_OK if report.ok else EXIT_DIFFERS


def _merge(args: argparse.Namespace) -> int:
    from . import ops

    _check_load_options(args.adapter, args.format, dict(args.load_option))
    report = ops.merge(args.base, args.adapter, args.out, strength=args.strength, dtype=args.dtype,
                       unmerge=args.unmerge, format=args.format, convention=args.convention,
                       allow_nonfinite=args.allow_nonfinite, force=args.force, progress=_progress(args),
                       options=dict(args.load_option), threads=args.threads)
    _emit(args, report)
    return EXIT_OK


def _extract(args: argparse.Namespace) -> int:
    from . import ops

    report = ops.extract(args.base, args.tuned, args.out, rank=args.rank, to=args.to, modules=args.modules,
                         dtype=args.dtype, force=args.force, progress=_progress(args),
                         save_options=dict(args.save_option))
    _emit(args, report)
    return EXIT_OK


def _resize(args: argparse.Namespace) -> int:
    from . import ops

    _check_load_options(args.adapter, args.format, dict(args.load_option))
    report = ops.resize(args.adapter, args.out, rank=args.rank, to=args.to, format=args.format,
                        convention=args.convention, force=args.force, options=dict(args.load_option),
                        save_options=dict(args.save_option))
    _emit(args, report)
    return EXIT_OK


def _verify(args: argparse.Namespace) -> int:
    from . import ops

    report = ops.verify(args.a, args.b, atol=args.atol, rtol=args.rtol, format_a=args.format_a,
                        format_b=args.format_b, convention_a=args.convention_a,
                        convention_b=args.convention_b, modules=_modules_from(args.modules_from))
    _emit(args, report, lambda: report.table(verbose=args.verbose))
    return EXIT_OK if report.ok else EXIT_DIFFERS


def _split(text: str | None) -> list[str] | None:
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


def _check(args: argparse.Namespace) -> int:
    from . import ops

    _check_load_options(args.adapter, args.format, dict(args.load_option))
    report = ops.check(args.adapter, dtypes=_split(args.dtypes) or [], backends=_split(args.backends),
                       base=args.base, format=args.format, convention=args.convention,
                       options=dict(args.load_option))
    _emit(args, report)
    return EXIT_OK if report.ok else EXIT_DIFFERS


def _demo(args: argparse.Namespace) -> int:
    from . import ops

    report = ops.demo(args.out, backends=_split(args.backends))
    _emit(args, report)
    return EXIT_OK if report.ok else EXIT_DIFFERS


# -- entry point ------------------------------------------------------------------------------

# a LoraError key that is a command-line value: its option
_OPTION_OF_KEY = {"strength": "--strength", "threads": "--threads", "dtype": "--dtype", "dtypes": "--dtypes",
                  "backends": "--backends", "modules": "--modules", "rank": "--rank", "atol": "--atol",
                  "rtol": "--rtol", "convention": "--convention"}
# the adapter file a command reads (verify reads two, extract checkpoints: none to assume)
_INPUT_OF_COMMAND = {"inspect": "path", "convert": "src", "merge": "adapter", "resize": "adapter",
                     "check": "adapter"}


def _where(exc: LoraError, args: argparse.Namespace) -> str:
    """The one-line message of ``exc``, located: an error that names no file is about a
    command-line value (``--strength: ...``) or else about the command's adapter file."""
    if exc.file is not None:
        return str(exc)
    option = _OPTION_OF_KEY.get(exc.key or "")
    if option is not None and getattr(args, exc.key, None) is not None:
        return f"{option}: {exc.detail}"
    source = getattr(args, _INPUT_OF_COMMAND.get(args.command, ""), None)
    if source is not None:
        return str(exc.with_file(source))
    return str(exc)


def _error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit code.

    ``--debug`` prints the traceback of an error before its one-line message; the exit code
    is the same as without it.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) and usage errors (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE

    def debug() -> None:
        if args.debug:
            traceback.print_exc(file=sys.stderr)

    try:
        with durable_writes(True if args.durable else None):
            return args.run(args)
    except LoraError as exc:
        debug()
        _error(" ".join(_where(exc, args).split("\n")))
        return EXIT_USAGE
    except OSError as exc:
        debug()
        where = f"{exc.filename}: " if exc.filename else ""
        _error(f"{where}{exc.strerror or exc}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        debug()
        _error("interrupted")
        return 130
    except Exception as exc:  # a bug: say so on one line; --debug shows where
        debug()
        hint = "" if args.debug else " (run with --debug for the traceback)"
        _error(f"internal error: {type(exc).__name__}: {exc}{hint}")
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
