"""MiniImagenet (Vinyals et al. 2016) with Ravi & Larochelle's split (64/16/20 classes).

Expected layout (the usual one):

    data_dir/
      images/n0153282900000005.jpg ...
      train.csv  val.csv  test.csv      # header "filename,label", one image a line

Images are resized to 84×84 RGB and kept in memory as uint8 (about 1.3 GB for
all three splits); decoded splits are cached as `.npz` in `cache_dir`, keyed by
the split CSV and every image it uses (path, size, modification time in
nanoseconds), so a changed image or CSV is decoded again. The cache is written
atomically (a temporary file, then a rename), and an unreadable one is ignored
and rebuilt.
"""

import csv
import hashlib
import os

import numpy as np
from absl import logging

from tf_maml.tasks import cache as cache_lib
from tf_maml.tasks.classification import ImageClassTasks

__all__ = ["load_split", "miniimagenet_tasks", "IMAGE_SIZE", "SPLIT_FILES"]

IMAGE_SIZE = 84
SPLIT_FILES = {"train": "train.csv", "val": "val.csv", "test": "test.csv"}
# Part of the cache key: bump when the decoded arrays change for the same source files.
_CACHE_VERSION = 2


def _read_csv(path):
    with open(path, newline="", encoding="utf-8-sig") as f:  # Excel writes a BOM
        rows = list(csv.reader(f))
    if not rows or [c.strip() for c in rows[0][:2]] != ["filename", "label"]:
        found = ",".join(rows[0]) if rows else "an empty file"
        raise ValueError(f"{path}: expected a CSV with header 'filename,label', found "
                         f"{found[:80]!r}")
    by_label, lines = {}, {}
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue  # a blank line (editors leave one at the end)
        if len(row) < 2:
            raise ValueError(f"{path}:{line}: expected 'filename,label', got {row!r}")
        name = row[0].strip()
        if name in lines:
            # One image twice would be its own support and query example in a task.
            raise ValueError(f"{path}:{line}: {name} is listed again (first on line "
                             f"{lines[name]}); list each image once")
        lines[name] = line
        by_label.setdefault(row[1].strip(), []).append(name)
    if not by_label:
        raise ValueError(f"{path}: no images listed")
    return by_label


def _decode(path):
    from PIL import Image
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE),
                                                          Image.LANCZOS), dtype=np.uint8)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: listed in the split CSV but missing") from None
    except Exception as e:
        raise ValueError(f"{path}: not a readable image ({e})") from None


def _cache_key(csv_path, image_paths):
    """The split CSV's path, and the size and modification time (ns) of it and every image."""
    digest = hashlib.sha1(f"v{_CACHE_VERSION}:{IMAGE_SIZE}:{os.path.abspath(csv_path)};"
                          .encode())
    for path in [csv_path] + image_paths:
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: listed in the split CSV but missing") from None
        digest.update(f"{os.path.basename(path)}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()[:16]


def _read_cache(path):
    """The images cached at `path`, or None when absent or unreadable."""
    cached = cache_lib.read_npz(path, ["images"], "MiniImagenet")
    return None if cached is None else cached[0]


def load_split(data_dir, split, cache_dir=None):
    """Loads one split as uint8 `[classes, images_per_class, 84, 84, 3]`.

    Classes are sorted by label; each keeps as many images as the smallest class
    has (600 in the standard split).

    Raises:
        FileNotFoundError: `data_dir`, its CSV or a listed image is missing.
        ValueError: a malformed CSV or an unreadable image.
    """
    data_dir = os.path.expanduser(data_dir)
    cache_dir = cache_lib.cache_directory(cache_dir)
    csv_path = os.path.join(data_dir, SPLIT_FILES[split])
    if not os.path.isfile(csv_path):
        raise FileNotFoundError(
            f"MiniImagenet: {csv_path} does not exist; expected {data_dir!r} to hold images/ and "
            "train.csv, val.csv, test.csv (Ravi & Larochelle's split)")
    by_label = _read_csv(csv_path)
    count = min(len(files) for files in by_label.values())
    dropped = sum(len(files) - count for files in by_label.values())
    if dropped:
        smallest = min(by_label, key=lambda label: len(by_label[label]))
        logging.warning("MiniImagenet %s: every class keeps %d images, as many as its smallest "
                        "(%s); %d listed images are not used", split, count, smallest, dropped)
    paths = [[os.path.join(data_dir, "images", name) for name in by_label[label][:count]]
             for label in sorted(by_label)]
    cache = None
    if cache_dir:
        key = _cache_key(csv_path, [path for row in paths for path in row])
        cache = os.path.join(cache_dir, f"miniimagenet_{split}_{key}.npz")
        cached = _read_cache(cache)
        if cached is not None:
            return cached
    logging.info("Decoding MiniImagenet %s: %d classes x %d images", split, len(by_label), count)
    images = np.stack([np.stack([_decode(path) for path in row]) for row in paths])
    if cache:
        cache_lib.write_npz(cache, images=images)
    return images


def miniimagenet_tasks(n_way, k_shot, k_query, data_dir, cache_dir=None):
    """MiniImagenet N-way K-shot tasks: train, val and test classes are disjoint.

    Returns:
        An `ImageClassTasks`.

    Raises:
        FileNotFoundError, ValueError: see `load_split`; too few classes or images.
    """
    data_dir = os.path.expanduser(data_dir) if data_dir else data_dir
    if not data_dir or not os.path.isdir(data_dir):
        what = ("is a file, not a directory (give the directory that holds images/ and the "
                "split CSVs)" if data_dir and os.path.exists(data_dir) else "does not exist")
        raise FileNotFoundError(f"MiniImagenet data_dir {data_dir!r} {what}")
    listed = {split: _read_csv(os.path.join(data_dir, name)) if os.path.isfile(
        os.path.join(data_dir, name)) else {} for split, name in SPLIT_FILES.items()}
    images = {split: {name for names in by_label.values() for name in names}
              for split, by_label in listed.items()}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        shared = sorted(set(listed[a]) & set(listed[b]))
        if shared:
            raise ValueError(f"MiniImagenet: {len(shared)} class(es) are in both {a} and {b} "
                             f"({', '.join(shared[:3])}); the splits must be disjoint")
        shared = sorted(images[a] & images[b])
        if shared:  # under other labels: a meta-test image seen in meta-training
            raise ValueError(f"MiniImagenet: {len(shared)} image(s) are listed in both "
                             f"{SPLIT_FILES[a]} and {SPLIT_FILES[b]} ({', '.join(shared[:3])}); "
                             f"the splits must be disjoint")
    splits = {split: load_split(data_dir, split, cache_dir) for split in SPLIT_FILES}
    return ImageClassTasks(splits, n_way, k_shot, k_query, name="miniimagenet")
