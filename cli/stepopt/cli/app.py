"""The typer application, shared options and the error boundary of the command line.

Library code raises :class:`~stepopt.errors.StepoptError`; here it becomes one line on stderr and
exit code 1 (a traceback only with ``--debug``). Usage errors exit 2 (click's convention).
Machine output (``--json``) goes to stdout, summaries and progress to stderr.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from stepopt import __version__, distributed
from stepopt.cli.flags import cli_message
from stepopt.errors import StepoptError
from stepopt.jsontext import json_text

F = TypeVar("F", bound=Callable[..., Any])

app = typer.Typer(
    name="stepopt",
    help="Optimize the time steps of few-step diffusion sampling, and sample and evaluate with them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _metavar_without_python_type() -> None:
    """typer writes an argument's Python type after its metavar (``FILE... <list[Path]>``); keep the metavar."""
    try:
        from typer.core import TyperArgument
    except ImportError:  # another typer layout: its default help stands
        return
    original = getattr(TyperArgument, "display_type_rich", None)
    if original is None:
        return

    def display_type_rich(self: Any, ctx: Any) -> Any:
        return None if self.metavar is not None else original(self, ctx)

    TyperArgument.display_type_rich = display_type_rich  # type: ignore[method-assign]


_metavar_without_python_type()


class _Globals:
    json: bool = False
    debug: bool = False


GLOBALS = _Globals()

# Shared option aliases (one help string each, reused by every command).
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object to stdout.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")]
ModelOpt = Annotated[
    str,
    typer.Option("--model", "-m", help="Model id: builtin:NAME, or LOADER:ARG (see `stepopt models`)."),
]
# The same defaults for every command that makes a schedule (optimize, baseline).
DEFAULT_SOLVER = "dpmpp-3m"
DEFAULT_NFE = 6
SolverOpt = Annotated[str, typer.Option("--solver", "-s", help="Solver registry name (see `stepopt models`).")]
OrderOpt = Annotated[int | None, typer.Option("--order", help="Solver order [default: the solver's default].")]
VariantOpt = Annotated[str | None, typer.Option("--variant", help="Solver variant, e.g. bh1/bh2 for unipc.")]
LofOpt = Annotated[
    bool | None,
    typer.Option(
        "--lower-order-final/--no-lower-order-final",
        help="Lower the order on the final steps [default: the solver's default].",
    ),
]
NfeOpt = Annotated[int, typer.Option("--nfe", "-n", min=1, help="Exact number of network evaluations.")]
TrustCodeOpt = Annotated[
    bool,
    typer.Option(
        "--trust-code",
        help="Allow model loaders that run code (python: factories, edm: pickles) and non-built-in model ids"
        " read from a schedule file. Only for files and checkpoints you trust.",
    ),
]
# The old name of --trust-code, still accepted (hidden from --help).
TrustPickleOpt = Annotated[bool, typer.Option("--trust-pickle", hidden=True, help="Old name of --trust-code.")]
# Seeds are non-negative 64-bit integers (numpy, torch and the .npz files store them as int64); a
# command that uses seeds SEED..SEED+N-1 checks the last one too (check_seed_range).
SEED_MAX = 2**63 - 1


def check_seed_range(seed: int, n: int, option: str = "--seed") -> None:
    """Usage error (exit 2) when the seeds ``seed .. seed + n - 1`` leave [0, 2^63 - 1]."""
    if seed + n - 1 > SEED_MAX:
        raise typer.BadParameter(
            f"{seed} + {n} samples runs past the largest seed {SEED_MAX}; use a smaller {option}",
            param_hint=f"'{option}'",
        )


DeviceOpt = Annotated[str, typer.Option("--device", help="auto (CUDA when available), cpu, cuda or cuda:N.")]


class NetDtype(str, Enum):
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


DtypeOpt = Annotated[
    NetDtype,
    typer.Option("--dtype", help="Network dtype; solver states stay float32 and grid arithmetic float64."),
]
# Text conditioning (latent text-to-image diffusers pipelines; other models refuse these options).
PromptOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--prompt",
        metavar="TEXT",
        help="Text prompt, repeatable; the sample of seed s uses prompt s mod P [default: ''].",
    ),
]
PromptFileOpt = Annotated[
    Path | None, typer.Option("--prompt-file", help="UTF-8 file of prompts, one a line (after any --prompt).")
]
NegativePromptOpt = Annotated[
    str | None,
    typer.Option("--negative-prompt", help="Unconditional prompt of classifier-free guidance [default: '']."),
]
GuidanceOpt = Annotated[
    float | None,
    typer.Option("--guidance", help="Classifier-free guidance scale s, 1 = none [default: 7.5, or the schedule's]."),
]


class FinalStep(str, Enum):
    none = "none"
    denoise = "denoise"


FinalStepOpt = Annotated[
    FinalStep, typer.Option("--final-step", help="'denoise' adds a final jump to sigma=0 (one more NFE).")
]


def _version_cb(value: bool) -> None:
    if value:
        typer.echo(f"stepopt {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version_cb, is_eager=True, help="Print the version and exit.")
    ] = False,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Global options apply to every command (they may also be given after the command)."""
    GLOBALS.json = json_out
    GLOBALS.debug = debug


def command(name: str | None = None, **kw: Any) -> Callable[[F], F]:
    """Register a command whose StepoptError / OSError become one line and exit 1.

    The wrapped function takes ``json_out`` and ``debug`` keyword options, merged with the
    global ones.
    """

    def deco(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if kwargs.get("json_out") is False and GLOBALS.json:
                kwargs["json_out"] = True
            debug = bool(kwargs.get("debug")) or GLOBALS.debug
            if "debug" in kwargs:
                kwargs["debug"] = debug
            try:
                if distributed.launched():  # one of several ranks (torchrun): rank 0 prints
                    err.quiet = not distributed.is_main()
                    distributed.quiet_backend_logs()
                    distributed.init_store()
                return fn(*args, **kwargs)
            except (typer.Exit, typer.Abort, SystemExit):
                raise
            except distributed.PeerFailure:
                if debug:
                    raise
                distributed.linger_for_reports()
                raise typer.Exit(1) from None  # the rank that failed says why
            except KeyboardInterrupt:
                if debug:
                    raise
                err.print("error: interrupted", style="red")
                raise typer.Exit(130) from None
            except (StepoptError, OSError) as e:
                if debug:
                    raise
                fail(_one_line(e))
            except MemoryError:
                if debug:
                    raise
                fail("out of memory; use a smaller --n or --batch-size")
            except Exception as e:  # a bug: the traceback is printed; among ranks, the others stop too
                distributed.note_crash(e)
                raise
            finally:
                distributed.shutdown()

        app.command(name, **kw)(wrapper)
        return fn

    return deco


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename is not None and not isinstance(e, StepoptError):
        return f"{e.filename}: {e.strerror or e.__class__.__name__}"
    return " ".join(str(e).split()) or e.__class__.__name__


def fail(message: str, code: int = 1) -> None:
    """Print ``error: message`` (one line, library parameters shown as their flags) to stderr and exit.

    Among several ranks the line names the rank, and an error every rank reports alike (a bad
    input) is printed once (:func:`stepopt.distributed.report_failure`).
    """
    message = cli_message(message)
    if distributed.launched():
        if not distributed.report_failure(message):
            raise typer.Exit(code)
        message = f"rank {distributed.rank()}: {message}"
        if distributed.is_main():
            _print_error(message)
            distributed.linger_for_reports()
            raise typer.Exit(code)
    _print_error(message)
    raise typer.Exit(code)


def _print_error(message: str) -> None:
    if err.quiet:
        sys.stderr.write(f"error: {message}\n")
        sys.stderr.flush()
    else:
        err.print(f"error: {message}", style="red", markup=False, highlight=False)


def emit_json(obj: Any) -> None:
    """The one machine-readable object, on stdout (once: by rank 0 among several ranks)."""
    if not distributed.is_main():
        return
    sys.stdout.write(json_text(obj) + "\n")  # strict JSON: sigma = inf is the string "inf"
    sys.stdout.flush()
