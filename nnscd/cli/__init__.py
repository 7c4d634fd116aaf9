"""The nnScd_* console scripts: each parses its command line, runs a tool or nnU-Net's entry point, and is the only
place where a UserError becomes `nnscd: error: ...` on stderr and exit status 2."""
import functools
import sys
from typing import Callable, NoReturn, TypeVar

from nnscd.core.errors import UserError
from nnscd.core.safe_io import disk_write_failure

Main = TypeVar("Main", bound=Callable[..., None])


def fail(message: str) -> NoReturn:
    """Stop a command with a message for the user (no traceback) and exit status 2."""
    print(f"nnscd: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def check_environment(*extra_checks: Callable[[], object]) -> None:
    """UserError for a bad nnscd environment variable (nnScd_cpu_bf16, nnScd_predict_batch_factor, and whatever
    `extra_checks` read) before any work: the checks raise ValueError saying what to set."""
    from nnscd.core.predictor import check_predictor_environment

    try:
        for check in (check_predictor_environment, *extra_checks):
            check()
    except ValueError as error:
        raise UserError(str(error)) from None


def console_script(main: Main) -> Main:
    """`main` as a console script: a UserError it raises, or a write that failed for a full disk or a read-only
    folder, ends the command with the message and exit status 2."""
    @functools.wraps(main)
    def script(*args, **kwargs) -> None:
        try:
            main(*args, **kwargs)
        except UserError as error:
            fail(str(error))
        except OSError as error:
            failure = disk_write_failure(error)
            if failure is None:
                raise
            fail(str(failure))
    return script
