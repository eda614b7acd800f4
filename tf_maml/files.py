"""Files written whole or not at all: a crash never leaves half a file in place."""

import contextlib
import json
import os
import uuid

from absl import logging

__all__ = ["replaced_atomically", "write_json", "saved_model_versions", "directory_lock"]


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
def directory_lock(path, waiting_message=None):
    """Holds an exclusive lock on the directory `path` while the block runs.

    An advisory `flock` on the directory itself (no file is left behind),
    waited for if another process holds it; the kernel drops it when its
    process ends, however it ends. Where locks are not available (remote
    storage, some network file systems, not POSIX) the block runs unlocked.

    Args:
        path: an existing local directory.
        waiting_message: logged once if the lock is held by another process.

    Example:

    ```python
    with directory_lock(export_dir):
        ...  # no other export writes into export_dir meanwhile
    ```
    """
    fd = None
    if "://" not in path:
        try:
            import fcntl  # noqa: PLC0415 -- POSIX only
            fd = os.open(path, os.O_RDONLY)
        except (ImportError, OSError):
            fd = None
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if waiting_message:
                    logging.info(waiting_message)
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:
                pass  # not supported here: unlocked
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock
