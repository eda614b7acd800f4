"""Files written whole or not at all: a crash never leaves half a file in place."""

import contextlib
import json
import os
import uuid

from absl import logging

__all__ = ["replaced_atomically", "write_json", "saved_model_versions", "exclusive_lock"]


@contextlib.contextmanager
def replaced_atomically(path, keep_extension=False, sync=False):
    """Yields a temporary path beside `path` that replaces `path` when the block succeeds.

    The temporary file is hidden and uniquely named (`.<name>.<hex>.tmp`, so
    concurrent writers never collide and TF Serving, TensorBoard and globs for
    `*.json` ignore it); it is removed on any error. A process killed while
    writing leaves the previous file in place, never half a file.

    Args:
        path: the final file.
        keep_extension: end the temporary name with `path`'s extension
            (`.<root>.<hex>.tmp.png`: writers that infer the format from it).
        sync: flush the file to disk before the rename (large caches).

    Example:

    ```python
    with replaced_atomically("results.json") as tmp, open(tmp, "w") as f:
        f.write("{}")
    ```
    """
    directory, name = os.path.split(path)
    root, extension = os.path.splitext(name) if keep_extension else (name, "")
    tmp = os.path.join(directory, f".{root}.{uuid.uuid4().hex}.tmp{extension}")
    try:
        yield tmp
        if sync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, payload, **dump_options):
    """Writes `payload` as JSON to `path` atomically (`replaced_atomically`)."""
    with replaced_atomically(path) as tmp, open(tmp, "w") as f:
        json.dump(payload, f, **dump_options)
        f.write("\n")
    return path


def saved_model_versions(path):
    """The numbered SavedModel versions under `path` (TF Serving's layout), sorted; [] if none."""
    try:
        names = os.listdir(path)
    except OSError:
        return []
    return sorted(int(name) for name in names if name.isdigit()
                  and os.path.isfile(os.path.join(path, name, "saved_model.pb")))


@contextlib.contextmanager
def exclusive_lock(path, waiting_message=None):
    """Holds an exclusive lock on the file `path` while the block runs; removes it after.

    An advisory `flock` on a file created for it, waited for if another holder
    has it; the kernel drops it when its process ends, however it ends (a
    killed holder leaves the empty file, which the next holder reuses). Each
    call opens the file anew, so a second lock on one path blocks even in the
    same process. The holder removes the file before releasing it, and a
    waiter that wakes on a removed file locks the new one instead, so exactly
    one holder runs at a time. Where locks are not available (remote storage,
    some network file systems, not POSIX) the block runs unlocked.

    Args:
        path: the lock file, in an existing local directory.
        waiting_message: logged (as a warning) once if another holder has it.

    Example:

    ```python
    with exclusive_lock(os.path.join(export_dir, ".tf_maml_export.lock")):
        ...  # no other export writes into export_dir meanwhile
    ```
    """
    fd = _locked(path, waiting_message) if "://" not in path else None
    try:
        yield
    finally:
        if fd is not None:
            try:
                os.unlink(path)  # while still held: see the docstring
            except OSError:
                pass
            os.close(fd)  # releases the lock


def _locked(path, waiting_message):
    """A descriptor of `path` holding its `flock`, or None where locks are not available."""
    try:
        import fcntl  # noqa: PLC0415 -- POSIX only
    except ImportError:
        return None
    waited = False
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting_message and not waited:
                logging.warning(waiting_message)
            waited = True
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            os.close(fd)
            return None  # not supported here: unlocked
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:
            return fd
        os.close(fd)  # the holder before removed it: lock the file there now
