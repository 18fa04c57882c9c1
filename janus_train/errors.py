"""User errors vs crashes at the command line.

A user error (a bad config value, recipe or override, a missing file, a data source above
``data.max_failure_rate``) prints one line naming the field or file and exits
:data:`EXIT_USER_ERROR` (2); retrying cannot fix it, so ``launch/slurm/job.sh`` never requeues
it. Anything else is a crash and keeps its traceback (exit 1): a lost node or a collective
timeout, which a requeue may fix. ``JANUS_DEBUG=1`` (or ``HYDRA_FULL_ERROR=1``) prints the full
traceback of user errors too.

Under torchrun the launcher's own status is 1 whatever the ranks returned, so a rank that stops
on a user error also writes its line to ``$JANUS_USER_ERROR_FILE`` when that is set (job.sh
sets it and reads it after the job step).

A checkpoint save that runs out of space (``ENOSPC``, a quota, or the errors torch turns them
into) is neither: the previous checkpoint stays ``latest`` and the run exits
:data:`EXIT_STORAGE_FULL` (3) with one line starting ``storage full:`` (also written to
``$JANUS_USER_ERROR_FILE``); retrying helps only once space is freed.
"""

from __future__ import annotations

import os
from pathlib import Path

EXIT_USER_ERROR = 2
EXIT_STORAGE_FULL = 3
"""A checkpoint could not be written for lack of space; requeue only after space is freed."""
_PKG = str(Path(__file__).resolve().parent)


class DataFailure(RuntimeError):
    """Too many bad samples in a source: the run must stop (message names the shard). Raised by
    the data loader; defined here, below every layer that raises or reports it."""


def _raised_in_package(exc: BaseException) -> bool:
    tb = exc.__traceback__
    last = None
    while tb is not None:
        last = tb
        tb = tb.tb_next
    return last is not None and os.path.abspath(last.tb_frame.f_code.co_filename).startswith(_PKG)


def is_user_error(exc: BaseException) -> bool:
    """Validation errors raised by this package (``ValueError``, ``FileNotFoundError``,
    ``NotADirectoryError``), a data failure (also when a loader worker re-raises it), and
    config errors of OmegaConf / Hydra (a typo, a wrong type, an unset variable). The same
    exception types raised inside torch or DeepSpeed are crashes."""
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(exc, (DataFailure, OmegaConfBaseException)):
        return True
    if type(exc).__name__ == "DataFailure" or "DataFailure: " in str(exc):
        return True  # torch's DataLoader re-raises a worker's exception as a wrapped copy
    try:
        from hydra.errors import HydraException

        if isinstance(exc, HydraException):
            return True
    except ImportError:  # pragma: no cover
        pass
    return isinstance(
        exc, (ValueError, FileNotFoundError, NotADirectoryError)
    ) and _raised_in_package(exc)


class StorageFull(RuntimeError):
    """A checkpoint save ran out of space; the message is the one line to print."""


# How torch's zip writer reports a short write (ENOSPC inside its C++ stream), and the errno text
_FULL_TEXT = (
    "unexpected pos",
    "No space left on device",
    "Disk quota exceeded",
    "file write failed",
)


def is_storage_full(exc: BaseException) -> bool:
    """``exc`` (or an exception it was raised from) means the file system is full."""
    import errno

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, StorageFull):
            return True
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(exc, RuntimeError) and any(t in str(exc) for t in _FULL_TEXT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def write_error_line(line: str) -> None:
    """Record ``line`` in ``$JANUS_USER_ERROR_FILE`` (when set) for ``launch/slurm/job.sh``."""
    path = os.environ.get("JANUS_USER_ERROR_FILE")
    if path:
        try:
            tmp = f"{path}.{os.getpid()}.tmp"
            Path(tmp).write_text(line + "\n")
            os.replace(tmp, path)
        except OSError:
            pass


def report_storage_full(exc: BaseException) -> int:
    """Print the ``storage full:`` line (stderr), record it; returns :data:`EXIT_STORAGE_FULL`."""
    import sys

    line = str(exc) if isinstance(exc, StorageFull) else f"storage full: {one_line(exc)}"
    print(line, file=sys.stderr, flush=True)
    write_error_line(line)
    return EXIT_STORAGE_FULL


def one_line(exc: BaseException) -> str:
    """The error's message on one line (a worker's wrapped traceback: its last line)."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    msg = lines[-1] if len(lines) > 1 and "Traceback" in str(exc) else " ".join(lines)
    head, sep, rest = msg.partition(": ")
    if (
        sep
        and head.replace(".", "").replace("_", "").isalnum()
        and head.split(".")[-1][:1].isupper()
    ):
        msg = rest  # "janus_train.errors.DataFailure: ..." -> the message
    cause = exc.__cause__
    if cause is not None and type(exc).__module__.startswith("hydra."):
        # "Error merging override train.log_every=abc" says where; OmegaConf's cause says why
        msg += f" ({str(cause).strip().splitlines()[0].strip()})"
    return msg


def debug_requested() -> bool:
    return any(os.environ.get(k, "") not in ("", "0") for k in ("JANUS_DEBUG", "HYDRA_FULL_ERROR"))


def report_user_error(prog: str, exc: BaseException) -> int:
    """Print the one line (stderr), record it for job.sh; returns :data:`EXIT_USER_ERROR`."""
    import sys

    line = f"{prog}: error: {one_line(exc)}"
    print(line + "  [JANUS_DEBUG=1 for the traceback]", file=sys.stderr, flush=True)
    write_error_line(line)
    return EXIT_USER_ERROR


def run_cli(prog: str, fn, *args) -> None:
    """Run a CLI's body: a user error prints one line and exits 2 (traceback on request); a
    closed stdout pipe (``| head``) ends quietly."""
    import sys

    try:
        fn(*args)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except Exception as e:
        if debug_requested() or not is_user_error(e):
            raise
        sys.exit(report_user_error(prog, e))
