"""Decoded-image caches: written atomically, so a crash never leaves a partial file behind."""

import os
import uuid

import numpy as np

__all__ = ["write_npz"]


def write_npz(path, **arrays):
    """Saves `arrays` to `path` (an `.npz`) atomically.

    The arrays go to a uniquely named hidden file beside `path`, are synced to disk, and
    replace `path` in one rename; the temporary file is removed on any error, so concurrent
    writers never collide and readers see either the old cache or the whole new one.

    Args:
        path: the cache file.
        **arrays: what `np.savez` saves.
    """
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
