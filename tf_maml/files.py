"""Files written whole or not at all: a crash never leaves half a file in place."""

import contextlib
import json
import os
import uuid

__all__ = ["replaced_atomically", "write_json", "saved_model_versions"]


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
