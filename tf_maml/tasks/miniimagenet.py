"""MiniImagenet (Vinyals et al. 2016) with Ravi & Larochelle's split (64/16/20 classes).

Expected layout (the usual one):

    data_dir/
      images/n0153282900000005.jpg ...
      train.csv  val.csv  test.csv      # header "filename,label", one image a line

Images are resized to 84×84 RGB and kept in memory as uint8 (about 1.3 GB for
all three splits); decoded splits are cached as `.npz` in `cache_dir`.
"""

import csv
import hashlib
import os

import numpy as np
from absl import logging

from tf_maml.tasks.classification import ImageClassTasks

__all__ = ["load_split", "miniimagenet_tasks", "IMAGE_SIZE", "SPLIT_FILES"]

IMAGE_SIZE = 84
SPLIT_FILES = {"train": "train.csv", "val": "val.csv", "test": "test.csv"}


def _read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or [c.strip() for c in rows[0][:2]] != ["filename", "label"]:
        raise ValueError(f"{path}: expected a CSV with header 'filename,label'")
    by_label = {}
    for line, row in enumerate(rows[1:], start=2):
        if len(row) < 2:
            raise ValueError(f"{path}:{line}: expected 'filename,label', got {row!r}")
        by_label.setdefault(row[1].strip(), []).append(row[0].strip())
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


def load_split(data_dir, split, cache_dir=None):
    """Loads one split as uint8 `[classes, images_per_class, 84, 84, 3]`.

    Classes are sorted by label; each keeps as many images as the smallest class
    has (600 in the standard split).

    Raises:
        FileNotFoundError: `data_dir`, its CSV or a listed image is missing.
        ValueError: a malformed CSV or an unreadable image.
    """
    csv_path = os.path.join(data_dir, SPLIT_FILES[split])
    if not os.path.isfile(csv_path):
        raise FileNotFoundError(
            f"MiniImagenet: {csv_path} does not exist; expected {data_dir!r} to hold images/ and "
            "train.csv, val.csv, test.csv (Ravi & Larochelle's split)")
    by_label = _read_csv(csv_path)
    cache = None
    if cache_dir:
        stat = os.stat(csv_path)
        key = hashlib.sha1(f"{os.path.abspath(csv_path)}:{stat.st_size}:{int(stat.st_mtime)}"
                           .encode()).hexdigest()[:16]
        cache = os.path.join(cache_dir, f"miniimagenet_{split}_{key}.npz")
        if os.path.exists(cache):
            with np.load(cache) as saved:
                return saved["images"]
    count = min(len(files) for files in by_label.values())
    logging.info("Decoding MiniImagenet %s: %d classes x %d images", split, len(by_label), count)
    images = np.stack([
        np.stack([_decode(os.path.join(data_dir, "images", name)) for name in by_label[label][:count]])
        for label in sorted(by_label)])
    if cache:
        os.makedirs(cache_dir, exist_ok=True)
        np.savez(cache + ".tmp.npz", images=images)
        os.replace(cache + ".tmp.npz", cache)
    return images


def miniimagenet_tasks(n_way, k_shot, k_query, data_dir, cache_dir=None):
    """MiniImagenet N-way K-shot tasks: train, val and test classes are disjoint.

    Returns:
        An `ImageClassTasks`.

    Raises:
        FileNotFoundError, ValueError: see `load_split`; too few classes or images.
    """
    if not data_dir or not os.path.isdir(data_dir):
        raise FileNotFoundError(f"MiniImagenet data_dir {data_dir!r} does not exist")
    splits = {split: load_split(data_dir, split, cache_dir) for split in SPLIT_FILES}
    return ImageClassTasks(splits, n_way, k_shot, k_query, name="miniimagenet")
