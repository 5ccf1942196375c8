"""What the demos' command lines share: one-line errors, the output policy, progress bars.

Every demo that writes files follows one policy (issue 21): nothing already on disk is
replaced unless the command says so.

- An output *folder* (``--out`` of ``deq_cifar10.py``, ``stable_anderson.py``,
  ``cpu_vs_gpu.py``) that holds files of an earlier run (the names the demo writes) is
  refused unless ``--overwrite`` is given (or ``--resume``, where the demo can continue a
  run); ``--overwrite`` deletes the earlier run's files before the new run writes, so that
  the folder never mixes two runs.  Files of other names are never touched.
- An output *file* (``--out`` of ``deq_solvers.py``, ``deq_compaction.py``) that exists is
  refused unless ``--overwrite`` is given, and is replaced atomically (a temporary file,
  then a rename), so that an interrupted write leaves the old file whole.
- Both are checked before any work, so that a refusal costs nothing.

An error in the user's input (flags, data, checkpoints, ``--out``) is :class:`Refused`:
the demo prints it as one line on stderr, ``error: ...``, and exits with status 2
(:func:`refuse`), as argparse does for a bad flag.

Progress bars (tqdm) are drawn only on a terminal: never into a redirected log unless asked
for, never with ``--no-progress`` (:func:`progress_disabled`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from pathlib import Path

__all__ = ["EXIT_REFUSED", "Refused", "refuse", "add_overwrite_flag", "add_progress_flag", "progress_disabled",
           "earlier_outputs", "check_out_folder", "remove_outputs", "make_out_folder", "check_out_file",
           "write_text_replacing"]

#: Exit status of a refused command line (argparse's for a bad flag).
EXIT_REFUSED = 2


class Refused(Exception):
    """An error in the user's input (flags, data, checkpoints, --out): printed as one line, exit status 2."""


def refuse(message: object) -> int:
    """Print ``error: message`` as one line on stderr; returns :data:`EXIT_REFUSED` for the demo to exit with."""
    text = " ".join(str(message).split())  # one line, whatever the message held
    print(f"error: {text}", file=sys.stderr)
    return EXIT_REFUSED


def add_overwrite_flag(parser, what: str = "the outputs of an earlier run in --out") -> None:
    """Add ``--overwrite`` (replace ``what``; without it they are refused) to an argparse parser or group."""
    parser.add_argument("--overwrite", action="store_true",
                        help=f"replace {what}; without it the command is refused and nothing is written")


def add_progress_flag(parser) -> None:
    """Add ``--no-progress`` to an argparse parser or group; :func:`progress_disabled` reads it."""
    parser.add_argument("--no-progress", action="store_true",
                        help="no tqdm progress bars (they are drawn only when stderr is a terminal, never into a "
                             "redirected log)")


def progress_disabled(no_progress: bool, stream=None) -> bool:
    """Whether tqdm's bars are off (its ``disable``): with ``--no-progress``, or when ``stream`` (default
    stderr, where tqdm draws) is not a terminal, e.g. redirected to a log file or a pipe."""
    if no_progress:
        return True
    stream = sys.stderr if stream is None else stream
    try:
        return not stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return True


def earlier_outputs(folder: str | os.PathLike, names: Iterable[str]) -> list[str]:
    """The files of an earlier run in ``folder``: those of ``names`` (and their ``.tmp`` leftovers) present, sorted."""
    wanted = set(names)
    wanted |= {n + ".tmp" for n in wanted}
    try:
        return sorted(n for n in os.listdir(folder) if n in wanted and os.path.isfile(os.path.join(folder, n)))
    except OSError:
        return []


def check_out_folder(folder: str | os.PathLike, names: Iterable[str], *, overwrite: bool, resume: bool = False,
                     can_resume: bool = False, flag: str = "--out") -> list[str]:
    """Refuse an output folder that is not usable, or that holds an earlier run without ``--overwrite``.

    Parameters
    ----------
    folder
        The folder (created later, when missing).
    names
        The file names the demo writes there.
    overwrite, resume
        Whether ``--overwrite`` or ``--resume`` was given (either allows an earlier run).
    can_resume
        Whether the demo has ``--resume`` (the message then offers it).
    flag
        The option that named the folder, for the messages.

    Returns
    -------
    list of str
        The earlier run's files (:func:`earlier_outputs`), for :func:`remove_outputs` under ``--overwrite``.

    Raises
    ------
    Refused
        When ``folder`` is a file, is not writable, or holds an earlier run without ``overwrite`` or ``resume``.
    """
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise Refused(f"{flag} {folder} is a file; expected a folder (it is created when missing)")
    if os.path.isdir(folder) and not os.access(folder, os.W_OK | os.X_OK):
        raise Refused(f"{flag} {folder}: the folder is not writable")
    earlier = earlier_outputs(folder, names)
    if earlier and not (overwrite or resume):
        again = "add --resume to continue it, --overwrite to replace it" if can_resume else \
            "add --overwrite to replace it"
        raise Refused(f"{flag} {folder} holds an earlier run ({', '.join(earlier)}); {again}, or choose another "
                      f"{flag}")
    return earlier


def remove_outputs(folder: str | os.PathLike, earlier: Iterable[str], flag: str = "--out") -> None:
    """Delete the earlier run's files ``earlier`` in ``folder`` (``--overwrite``) and say so on stdout."""
    earlier = list(earlier)
    if not earlier:
        return
    for name in earlier:
        try:
            os.remove(os.path.join(folder, name))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise Refused(f"--overwrite: cannot delete {os.path.join(folder, name)} ({exc.strerror or exc})") \
                from None
    print(f"--overwrite: deleted the earlier run's {', '.join(earlier)} in {folder}")


def make_out_folder(folder: str | os.PathLike, earlier: Iterable[str] = (), flag: str = "--out") -> None:
    """Delete the earlier run's files ``earlier`` (:func:`remove_outputs`: pass them under ``--overwrite`` only)
    and create ``folder`` with its parents when missing.

    Raises
    ------
    Refused
        When a file cannot be deleted or the folder cannot be created (one line naming it).
    """
    remove_outputs(folder, earlier, flag)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise Refused(f"{flag} {folder}: cannot create the folder ({exc.strerror or exc})") from None


def check_out_file(path: str | os.PathLike, *, overwrite: bool, inputs: Iterable[str | os.PathLike] = (),
                   flag: str = "--out") -> None:
    """Refuse an output file that exists without ``--overwrite``, that is a folder, or that is one of ``inputs``.

    Raises
    ------
    Refused
        With a one-line message naming ``flag`` and ``path``.
    """
    target = Path(path)
    if target.is_dir():
        raise Refused(f"{flag} {path} is a folder; expected a file name")
    resolved = target.resolve()
    if any(Path(p).resolve() == resolved for p in inputs):
        raise Refused(f"{flag} {path} is one of the input files; choose another {flag}")
    if target.exists() and not overwrite:
        raise Refused(f"{flag} {path} exists; add --overwrite to replace it, or choose another {flag}")
    parent = next((p for p in resolved.parents if p.exists()), None)
    if parent is not None and (not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK)):
        raise Refused(f"{flag} {path}: {parent} is not a writable folder")


def write_text_replacing(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a temporary file beside it, then a rename); missing folders are made."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, target)
