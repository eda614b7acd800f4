"""Decoded-image caches: written atomically, so a crash never leaves a partial file behind."""

import glob
import os
import time

import numpy as np
from absl import logging

from tf_maml import files

__all__ = ["cache_directory", "read_npz", "write_npz"]


def cache_directory(cache_dir):
    """`cache_dir` with `~` expanded, or `None` for no cache; checked before any decoding.

    Raises:
        ValueError: `cache_dir` names something other than a directory.
    """
    if not cache_dir:
        return None
    path = os.path.expanduser(cache_dir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"cache_dir {cache_dir!r} is a file, not a directory; give a directory "
                         "for the decoded-image cache (or '' for none)")
    return path


def read_npz(path, names, what, layout="classes"):
    """The arrays `names` of the cache at `path`, or `None` when it is absent or unreadable.

    The first array must be uint8 images: `[classes, examples, H, W, C]` (layout
    "classes"), or `[examples, H, W, C]` (layout "flat", classes of different sizes;
    the caller checks the other arrays). A truncated or foreign file is logged and
    ignored (the caller decodes again and rewrites it).

    Args:
        path: the cache file.
        names: the arrays to read: images first, then any per-class vectors.
        what: the data set's name, for the log line.
        layout: "classes" or "flat" (see above).

    Returns:
        A list of numpy arrays in the order of `names`, or `None`.
    """
    if not os.path.exists(path):
        return None
    _remove_stale_temporaries(path)  # a killed writer's, once no rerun writes the cache again
    try:
        with np.load(path) as saved:
            arrays = [saved[name] for name in names]
        images = arrays[0]
        if images.dtype != np.uint8 or images.ndim != (5 if layout == "classes" else 4):
            raise ValueError(f"unexpected images {images.dtype} {images.shape}")
        for name, array in zip(names[1:], arrays[1:] if layout == "classes" else []):
            if array.shape != images.shape[:1]:  # one value per class
                raise ValueError(f"{name} {array.shape} does not match images {images.shape}")
    except Exception as e:  # a truncated or foreign file: zipfile, EOF, value errors
        logging.warning("Ignoring the unreadable %s cache %s (%s); decoding again", what, path, e)
        return None
    return arrays


def write_npz(path, **arrays):
    """Saves `arrays` to `path` (an `.npz`) atomically.

    The arrays go to a uniquely named hidden file beside `path`, are synced to disk, and
    replace `path` in one rename; the temporary file is removed on any error, so concurrent
    writers never collide and readers see either the old cache or the whole new one. What
    a killed writer left (a temporary file untouched for an hour) is removed then, or when
    the cache is next read. A cache that cannot be written (a read-only or full disk) is
    logged and skipped: the decoded arrays are in memory, and the next run decodes again.

    Args:
        path: the cache file.
        **arrays: what `np.savez` saves.
    """
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with files.replaced_atomically(path, sync=True) as tmp, open(tmp, "xb") as f:
            np.savez(f, **arrays)
        _remove_stale_temporaries(path)
    except OSError as e:
        logging.warning("Could not write the cache %s (%s); going on without it", path, e)


STALE_SECONDS = 3600  # a temporary file untouched this long is no writer's any more


def _remove_stale_temporaries(path):
    """Removes the temporary files of `path` that killed writers left (a kill -9 mid-write)."""
    pattern = os.path.join(glob.escape(os.path.dirname(path)),
                           f".{glob.escape(os.path.basename(path))}.*.tmp")
    for stale in glob.glob(pattern):
        try:
            if time.time() - os.path.getmtime(stale) > STALE_SECONDS:
                os.remove(stale)
        except OSError:
            pass  # another writer's cleanup got there first
