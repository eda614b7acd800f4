"""Omniglot (Lake, Salakhutdinov & Tenenbaum, 2015) for few-shot classification.

Sources, one in-memory result: the archives as Lake et al. publish them
(`images_background.zip`, `images_evaluation.zip`, or their extracted
folders) in `data_dir`, or TensorFlow Datasets' `omniglot` when no
`data_dir` is given. Every character becomes a uint8 array of its 20 drawings
at 28×28, ink = 255 (the images are inverted: ink is black in the source).
Both sources decode alike (same grayscale conversion and resize filter) and
order characters alike (archive, alphabet, character), so the "paper" split
picks the same characters from either; only the order of the 20 drawings
within a character may differ (TFDS does not keep the drawing number).

Splits: "paper" (the MAML paper): the 1623 characters are shuffled with a fixed
seed, irrespective of alphabet, and the first 1200 are for meta-training, the
rest for meta-testing; "lake": background alphabets for meta-training,
evaluation alphabets for meta-testing.

Resize filters (105×105 → 28×28): "lanczos", the MAML code's preprocessing
(grey levels at the strokes' edges), or "nearest", what Reptile's code gets
from PIL for the 1-bit PNGs (binary images, aliased strokes).

Decoding 32,460 PNGs takes a while; the decoded arrays are cached as `.npz`
in `cache_dir`, keyed by the source files' names, sizes and modification times
(nanoseconds), so a changed archive is decoded again. The cache is written
atomically (a temporary file, then a rename), and an unreadable one (say,
truncated by a full disk) is ignored and rebuilt.
"""

import hashlib
import io
import os
import re
import zipfile

import numpy as np
from absl import logging

from tf_maml.config import OMNIGLOT_RESIZE_FILTERS
from tf_maml.tasks import cache as cache_lib
from tf_maml.tasks import downloads
from tf_maml.tasks.classification import ImageClassTasks

__all__ = ["load_characters", "split_characters", "hold_out_validation", "omniglot_tasks",
           "ARCHIVES", "IMAGE_SIZE", "NUM_TRAIN_CHARACTERS", "RESIZE_FILTERS"]

ARCHIVES = ("images_background", "images_evaluation")
IMAGE_SIZE = 28
DRAWINGS_PER_CHARACTER = 20
NUM_TRAIN_CHARACTERS = 1200
RESIZE_FILTERS = OMNIGLOT_RESIZE_FILTERS
# Part of the cache key: bump when the decoded arrays change for the same source files.
_CACHE_VERSION = 2
_PNG = re.compile(r"^(images_background|images_evaluation)/([^/]+)/(character\d+)/([^/]+\.png)$")


def _check_resize_filter(resize_filter):
    if resize_filter not in RESIZE_FILTERS:
        raise ValueError(f"Omniglot resize_filter must be one of {', '.join(RESIZE_FILTERS)}, "
                         f"got {resize_filter!r}")


def _to_array(image, resize_filter="lanczos"):
    """A PIL image as the loader keeps it: grayscale, 28×28, inverted (ink = 255).

    "nearest" on the grayscale image picks the same pixels as PIL's resize of
    the source's 1-bit image (Reptile's loader), which always resamples 1-bit
    images by nearest neighbour.
    """
    from PIL import Image
    method = Image.LANCZOS if resize_filter == "lanczos" else Image.NEAREST
    image = image.convert("L").resize((IMAGE_SIZE, IMAGE_SIZE), method)
    return 255 - np.asarray(image, dtype=np.uint8)


def _decode(data, path, resize_filter="lanczos"):
    from PIL import Image
    try:
        with Image.open(io.BytesIO(data)) as image:
            return _to_array(image, resize_filter)
    except Exception as e:  # PIL raises many types for bad data
        raise ValueError(f"{path}: not a readable PNG image ({e})") from None


def _source_files(data_dir):
    """[(archive name, path, is_zip)] for both archives, or raises with what is expected."""
    if not os.path.isdir(data_dir):
        what = ("is a file, not a directory (give the directory that holds it)"
                if os.path.exists(data_dir) else "does not exist")
        raise FileNotFoundError(
            f"Omniglot data_dir {data_dir!r} {what}; expected a directory holding "
            f"images_background.zip and images_evaluation.zip (or their extracted folders)")
    found = []
    for archive in ARCHIVES:
        folder = os.path.join(data_dir, archive)
        archive_zip = folder + ".zip"
        if os.path.isdir(folder):
            found.append((archive, folder, False))
        elif os.path.isfile(archive_zip):
            found.append((archive, archive_zip, True))
        else:
            raise FileNotFoundError(
                f"Omniglot: neither {archive_zip} nor the folder {folder} exists in {data_dir!r} "
                "(expected the archives as Lake et al. publish them)")
    return found


def _read_archive(archive, path, is_zip, resize_filter):
    """{(alphabet, character): [image, ...]} of one archive."""
    characters = {}
    if is_zip:
        try:
            with zipfile.ZipFile(path) as z:
                names = [n for n in z.namelist() if n.endswith(".png")]
                for name in names:
                    match = _PNG.match(name)
                    if not match or match.group(1) != archive:
                        raise ValueError(
                            f"{path}: unexpected entry {name!r}; expected "
                            f"{archive}/<alphabet>/characterNN/<drawing>.png")
                    key = (match.group(2), match.group(3))
                    characters.setdefault(key, []).append(
                        (match.group(4), _decode(z.read(name), f"{path}:{name}", resize_filter)))
        except zipfile.BadZipFile as e:
            raise ValueError(f"{path} is not a valid zip archive ({e})") from None
    else:
        for alphabet in sorted(os.listdir(path)):
            alphabet_dir = os.path.join(path, alphabet)
            if not os.path.isdir(alphabet_dir):
                continue
            for character in sorted(os.listdir(alphabet_dir)):
                character_dir = os.path.join(alphabet_dir, character)
                if not os.path.isdir(character_dir):
                    continue
                for drawing in sorted(os.listdir(character_dir)):
                    if drawing.endswith(".png"):
                        file = os.path.join(character_dir, drawing)
                        with open(file, "rb") as f:
                            characters.setdefault((alphabet, character), []).append(
                                (drawing, _decode(f.read(), file, resize_filter)))
    if not characters:
        raise ValueError(f"{path}: no images found; expected "
                         f"{archive}/<alphabet>/characterNN/<drawing>.png")
    for key, drawings in characters.items():
        if len(drawings) != DRAWINGS_PER_CHARACTER:
            raise ValueError(f"{path}: character {'/'.join(key)} has {len(drawings)} drawings, "
                             f"expected {DRAWINGS_PER_CHARACTER}")
    return characters


def _cache_key(files, resize_filter):
    """Names, sizes and modification times (ns) of every source file, and the format."""
    # The default filter keeps the key it had before filters were a choice.
    filter_key = "" if resize_filter == "lanczos" else f"{resize_filter};"
    digest = hashlib.sha1(f"v{_CACHE_VERSION}:{IMAGE_SIZE};{filter_key}".encode())
    for archive, path, _ in files:
        paths = [path]
        if os.path.isdir(path):
            paths = sorted(os.path.join(root, f) for root, _, names in os.walk(path)
                           for f in names)
        for p in paths:
            stat = os.stat(p)
            digest.update(f"{os.path.relpath(p, path)}:{stat.st_size}:{stat.st_mtime_ns};"
                          .encode())
        digest.update(archive.encode())
    return digest.hexdigest()[:16]


def _read_cache(path):
    """`(images, background)` cached at `path`, or None when absent or unreadable."""
    cached = cache_lib.read_npz(path, ["images", "background"], "Omniglot")
    return None if cached is None else tuple(cached)


def load_characters(data_dir=None, cache_dir=None, resize_filter="lanczos"):
    """Loads every Omniglot character, decoded to 28×28, ink = 255.

    Args:
        data_dir: directory with `images_background(.zip)` and
            `images_evaluation(.zip)`; None loads TFDS' `omniglot` (downloads
            it on first use, in TFDS' own data directory).
        cache_dir: where decoded arrays are cached (None: no cache).
        resize_filter: "lanczos" (MAML's preprocessing) or "nearest" (Reptile's).

    Returns:
        `(images, background)`: uint8 `[1623, 20, 28, 28, 1]` (characters sorted
        by archive, alphabet, character) and a bool `[1623]` marking characters
        of the background set.

    Raises:
        FileNotFoundError: `data_dir` or an archive is missing.
        ValueError: a corrupt archive or image, an unexpected layout, an
            unknown `resize_filter`, or (no `data_dir`) TFDS' copy is not
            prepared and its download server cannot be reached.
    """
    _check_resize_filter(resize_filter)
    cache_dir = cache_lib.cache_directory(cache_dir)
    if data_dir is None:
        return _load_tfds(resize_filter)
    data_dir = os.path.expanduser(data_dir)
    files = _source_files(data_dir)
    cache = None
    if cache_dir:
        cache = os.path.join(cache_dir, f"omniglot_{_cache_key(files, resize_filter)}.npz")
        cached = _read_cache(cache)
        if cached is not None:
            return cached
    images, background = [], []
    for archive, path, is_zip in files:
        logging.info("Decoding Omniglot %s, %s resize (seconds; cached afterwards)",
                     path, resize_filter)
        characters = _read_archive(archive, path, is_zip, resize_filter)
        for key in sorted(characters):
            drawings = [image for _, image in sorted(characters[key])]
            images.append(np.stack(drawings))
            background.append(archive == "images_background")
    images = np.stack(images)[..., None]
    background = np.array(background)
    if cache:
        cache_lib.write_npz(cache, images=images, background=background)
    return images, background


def _load_tfds(resize_filter):
    """Characters of TFDS' `omniglot` ("train": background, "test": evaluation).

    Decoded like the archives (`_to_array`) and ordered like them: by alphabet
    name, then character number. (TFDS' `label`, Lake's global character
    number, orders alphabets otherwise, which would change the "paper" split.)
    """
    import tensorflow_datasets as tfds
    from PIL import Image
    logging.info("Loading Omniglot from TensorFlow Datasets (downloads on first use)")
    builder = tfds.builder("omniglot")
    if not builder.is_prepared():
        downloads.check_tfds_downloadable(
            builder, "Pass data_dir (--data_dir): a directory with Lake's images_background.zip "
            "and images_evaluation.zip, or their folders")
    images, background = [], []
    for split, is_background in (("train", True), ("test", False)):
        dataset = tfds.load("omniglot", split=split)
        by_character = {}
        for example in dataset.as_numpy_iterator():
            # "alphabet" indexes the sorted alphabet names; "alphabet_char_id" is NN - 1 of
            # the archive's characterNN.
            key = (int(example["alphabet"]), int(example["alphabet_char_id"]))
            by_character.setdefault(key, []).append(
                _to_array(Image.fromarray(example["image"]), resize_filter)[..., None])
        for key in sorted(by_character):
            if len(by_character[key]) != DRAWINGS_PER_CHARACTER:
                raise ValueError(f"TFDS omniglot {split}: character {key[1] + 1} of alphabet "
                                 f"{key[0]} has {len(by_character[key])} drawings, expected "
                                 f"{DRAWINGS_PER_CHARACTER}")
            images.append(np.stack(by_character[key]))
            background.append(is_background)
    return np.stack(images), np.array(background)


def split_characters(background, split="paper", seed=0):
    """Indices of meta-training and meta-test characters.

    Args:
        background: bool `[num_characters]` from `load_characters`.
        split: "paper" (1200 random characters for training, the rest for test)
            or "lake" (background set for training, evaluation set for test).
        seed: the shuffle seed of the "paper" split (recorded in the run's config).

    Returns:
        `(train_indices, test_indices)`, numpy int arrays.

    Raises:
        ValueError: unknown split, or too few characters.
    """
    count = len(background)
    if split == "lake":
        return np.flatnonzero(background), np.flatnonzero(~np.asarray(background))
    if split != "paper":
        raise ValueError(f"omniglot_split must be 'paper' or 'lake', got {split!r}")
    if count <= NUM_TRAIN_CHARACTERS:
        raise ValueError(f"Omniglot has {count} characters; the paper split needs more than "
                         f"{NUM_TRAIN_CHARACTERS}")
    order = np.random.RandomState(seed).permutation(count)
    return np.sort(order[:NUM_TRAIN_CHARACTERS]), np.sort(order[NUM_TRAIN_CHARACTERS:])


def hold_out_validation(train, count, seed=0):
    """Moves `count` characters of the meta-training set into a validation set.

    The original MAML code trains on 1100 of its 1200 training characters and
    validates on the other 100, so that nothing watched during training comes
    from the meta-test characters.

    Args:
        train: indices of the meta-training characters (from `split_characters`).
        count: characters to hold out (0: none).
        seed: the shuffle seed (the run's `split_seed`).

    Returns:
        `(train_indices, validation_indices)`, sorted numpy int arrays, disjoint.

    Raises:
        ValueError: `count` negative or not below the number of training characters.
    """
    train = np.asarray(train)
    if not 0 <= count < len(train):
        raise ValueError(f"omniglot_validation_characters must be in [0, {len(train)}) (the "
                         f"split has {len(train)} meta-training characters), got {count}")
    # A stream of its own (seed + 1): the paper split's permutation stays as it was.
    order = np.random.RandomState(seed + 1).permutation(len(train))
    return np.sort(train[order[count:]]), np.sort(train[order[:count]])


def omniglot_tasks(n_way, k_shot, k_query, data_dir=None, cache_dir=None, split="paper",
                   split_seed=0, rotate_train=True, validation_characters=0,
                   resize_filter="lanczos"):
    """Omniglot N-way K-shot tasks with the paper's protocol.

    Args:
        n_way, k_shot, k_query: task shape (k per class).
        data_dir: Lake's archives or folders; None uses TFDS.
        cache_dir: cache for decoded images.
        split: "paper" or "lake" (see `split_characters`).
        split_seed: seed of the paper split.
        rotate_train: rotations by 90°, 180°, 270° as extra training classes.
        validation_characters: meta-training characters held out (unrotated)
            for the validation during training (`hold_out_validation`); 0:
            validation samples the meta-test characters.
        resize_filter: "lanczos" (MAML's preprocessing) or "nearest" (Reptile's).

    Returns:
        An `ImageClassTasks`.

    Raises:
        ValueError: bad split or counts, or fewer validation characters than `n_way`.
    """
    images, background = load_characters(data_dir, cache_dir, resize_filter)
    train, test = split_characters(background, split, split_seed)
    splits = {"test": images[test]}
    if validation_characters:
        train, val = hold_out_validation(train, validation_characters, split_seed)
        if len(val) < n_way:
            raise ValueError(f"omniglot_validation_characters={validation_characters} is fewer "
                             f"than n_way={n_way}: a validation task needs n_way characters")
        splits["val"] = images[val]
    splits["train"] = images[train]
    return ImageClassTasks(splits, n_way, k_shot, k_query, rotate_train=rotate_train,
                           name="omniglot")
