"""Writing a run's files without losing anything: atomic replacement, one writer per output,
outputs that never land on an input.

- `atomic_write(path, write)`: readers see the old file or the complete new one, never half.
- `OutputLock(path)`: an exclusive lock on a run's output (a `<name>.lock` file beside it,
  flock-ed), so two runs on the same `--out` cannot interleave logs or lose an adapter. The
  kernel drops the lock when its process dies, so a crashed run leaves no stale lock behind,
  only a lock file the next run reuses and removes.
- `check_paths(outputs, inputs)`: refuses outputs that are the same file as an input or as
  each other (`--out t.jsonl` over the training data, `--out run.ckpt` over its checkpoint).
- `check_output(path, what, reads)`: the rule every writer (CLI and Python) applies to a file
  it is about to write: not a directory, not a file the run reads (`reads`: files, or model
  directories), not a file of minipara itself.
"""

import fcntl
import os
import re
import socket
import tempfile
import time
from pathlib import Path
from typing import Callable

from minipara.errors import UserError


def atomic_write(path, write: Callable[[str], None]):
    """Write `path` through `write(tmp_name)` into a temporary file in the same folder, flushed
    to disk, then renamed over `path`. The file gets the usual permissions (umask), not
    mkstemp's private ones."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def remove_stale_temps(path):
    """Delete the temporary files atomic_write left beside `path` when its process was killed
    (SIGKILL, power loss). Only for a caller that holds `path`'s lock: no one else writes it."""
    path = Path(path)
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        tmp.unlink(missing_ok=True)


def _same(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)  # hard links and symlinks too
    return os.path.realpath(a) == os.path.realpath(b)


def check_paths(outputs: dict[str, Path], inputs: dict[str, Path]):
    """Refuse an output that is an input, or two outputs that are one file. Keys name them in
    the message; keys that are option names (`out`, `train`) are marked as options, so the
    scripts print them as flags."""
    outs = list(outputs.items())
    for i, (name, out) in enumerate(outs):
        for in_name, src in inputs.items():
            if src is not None and _same(out, Path(src)):
                raise UserError(
                    f"{name} {out} is the {in_name} file: it would be overwritten; choose another out",
                    _options(name, in_name),
                )
        for other, out2 in outs[i + 1 :]:
            if _same(out, out2):
                raise UserError(
                    f"{name} and {other} would both be {out}; choose an out whose name ends in .safetensors",
                    _options(name, other),
                )


PACKAGE = Path(__file__).resolve().parents[1]  # minipara's own files
# What loading a model directory reads: weights, config, tokenizer, template and the conversion's
# marker. Other files there (a benchmark's JSON written beside its model) may be replaced.
MODEL_FILES = re.compile(
    r"(model|config|tokenizer|special_tokens|added_tokens|generation_config|chat_template).*|\.complete"
)


def check_output(path, what: str, reads=(), options: tuple[str, ...] = ()):
    """Refuse, before any work, writing `what` to `path` when it is a directory, a file the run
    reads (in `reads`, or a model directory of `reads`'s MODEL_FILES: config, weights,
    tokenizer), or one of minipara's own files. `options`: the parameter names the message
    mentions (UserError.options)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a directory: give a file name inside it", options)
    if Path(os.path.realpath(path)).is_relative_to(PACKAGE):
        raise UserError(f"{what} {path} is inside the minipara package: write it elsewhere", options)
    for r in reads:
        if r is None:
            continue
        r = Path(r)
        files = [f for f in r.iterdir() if f.is_file() and MODEL_FILES.fullmatch(f.name)] if r.is_dir() else [r]
        hit = next((f for f in files if _same(path, f)), None)
        if hit is not None:
            where = f"a file of {r}" if r.is_dir() else "a file this run reads"
            raise UserError(f"{what} {path} is {where}: it would be overwritten; write it elsewhere", options)


def _options(*names: str) -> tuple[str, ...]:
    return ("out", *(n for n in names if n.isidentifier() and n != "out"))


def check_writable(path: Path, what: str):
    """Refuse early (before any work) an output whose folder cannot be made or written."""
    d = Path(path).absolute().parent
    while not d.exists():
        d = d.parent
    if not d.is_dir() or not os.access(d, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {what} {path}: {d} is not a writable folder")


class OutputLock:
    """`with OutputLock(out):` holds an exclusive lock on `out` for the block, or refuses
    at once with the holder's pid, host and start time."""

    def __init__(self, target):
        self.target = Path(target)
        self.path = self.target.with_name(self.target.name + ".lock")
        self.fd = None
        self.made = []  # folders made for it, removed again if the run leaves them empty

    def __enter__(self):
        d = self.path.absolute().parent
        while not d.exists():
            self.made.append(d)
            d = d.parent
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as e:
                raise UserError(f"cannot create the lock file {self.path}: {e.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise UserError(
                    f"{self.target} is being written by another run ({holder}); wait for it to end "
                    f"or choose another out (if no such run exists, delete {self.path})",
                    ("out",),
                ) from None
            # The holder may have removed the file between our open and flock: lock the current one.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        since = time.strftime("%Y-%m-%d %H:%M:%S")
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {since}".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)  # while still locked: a waiting run then re-opens a new file
        os.close(self.fd)
        self.fd = None
        for d in self.made:
            try:
                d.rmdir()
            except OSError:  # not empty: the run wrote its files there
                break
