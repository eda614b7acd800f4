"""Meta-training on the user's own data: arrays, image folders, TFDS data sets, functions.

Folder tests use a few characters of the real Omniglot archive when TF_MAML_OMNIGLOT_DIR
names its directory (.ci/run sets it), otherwise PNGs drawn with PIL.
"""

import io
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile

import numpy as np
import pytest
import tensorflow as tf

from tf_maml import config as config_lib
from tf_maml import tasks as tasks_lib
from tf_maml.tasks import downloads, sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OMNIGLOT_ENV = "TF_MAML_OMNIGLOT_DIR"


def _seed(a, b=0):
    return tf.constant([a, b], tf.int64)


def _features(counts):
    """Examples whose features name them: x = [class, index in class, 7]; labels = class."""
    x, y = [], []
    for c, count in enumerate(counts):
        for i in range(count):
            x.append([c, i, 7.0])
            y.append(c)
    return np.array(x, np.float32), np.array(y, np.int64)


# Classes of unequal sizes: 3 to 9 examples.
COUNTS = [3 + (c * 5) % 7 for c in range(20)]


def _check_episode(episode, n_way, k_shot, k_query, counts):
    """Every task: n_way distinct classes, consistent labels, disjoint support and query."""
    sx, sy, qx, qy = (t.numpy() for t in episode)
    assert sx.shape[1:] == (n_way * k_shot, 3) and qx.shape[1:] == (n_way * k_query, 3)
    assert sy.dtype == np.int32 and sx.dtype == np.float32
    used = []
    for t in range(len(sx)):
        assert sorted(np.bincount(sy[t], minlength=n_way)) == [k_shot] * n_way
        assert sorted(np.bincount(qy[t], minlength=n_way)) == [k_query] * n_way
        classes = {}
        for x, y in zip(np.concatenate([sx[t], qx[t]]), np.concatenate([sy[t], qy[t]])):
            assert classes.setdefault(int(y), int(x[0])) == int(x[0])  # one class per label
            assert 0 <= x[1] < counts[int(x[0])]  # an example of that class's own
        assert len(set(classes.values())) == n_way
        examples = [tuple(x[:2]) for x in np.concatenate([sx[t], qx[t]])]
        assert len(set(examples)) == len(examples)  # support and query disjoint, no repeats
        used.extend(classes.values())
    return set(used)


def test_array_tasks_sample_valid_seeded_episodes_from_unequal_classes():
    x, y = _features(COUNTS)
    tasks = tasks_lib.array_tasks(x, y, n_way=3, k_shot=2, k_query=1, seed=3)
    assert tasks.input_shape == (3,) and tasks.output_size == 3 and tasks.is_classification
    assert {s: len(c) for s, c in tasks.class_names.items()} == {"train": 13, "val": 3, "test": 4}
    splits = {s: set(c) for s, c in tasks.class_names.items()}
    assert not (splits["train"] & splits["val"] or splits["train"] & splits["test"]
                or splits["val"] & splits["test"])
    for split in ("train", "val", "test"):
        used = set()
        for step in range(4):
            used |= _check_episode(tasks.sample(_seed(step, 5), 16, split), 3, 2, 1, COUNTS)
        assert used <= splits[split]  # held-out classes never appear in training tasks
    assert used == splits["test"]

    first = tasks.sample(_seed(1), 4)
    for a, b in zip(first, tasks.sample(_seed(1), 4)):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first.support_x, tasks.sample(_seed(2), 4).support_x)
    # Traceable: the same episode in a tf.function and a tf.data map.
    traced = tf.function(lambda s: tasks.sample(s, 4))(_seed(1))
    mapped = next(iter(tf.data.Dataset.from_tensors(_seed(1)).map(lambda s: tasks.sample(s, 4))))
    for a, b, c in zip(first, traced, mapped):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    # A larger k_shot than the family's (train_k_shot): checked against the class sizes.
    _check_episode(tasks.sample(_seed(3), 4, k_shot=2), 3, 2, 1, COUNTS)
    with pytest.raises(ValueError, match=r"fewer than k_shot \+ k_query = 11"):
        tasks.sample(_seed(3), 4, k_shot=10)


def test_array_tasks_images_and_explicit_class_split():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (60, 4, 4, 1), dtype=np.uint8)
    y = np.repeat(np.arange(6), 10)
    tasks = tasks_lib.array_tasks(x, y, 2, 1, 3, class_split={"train": [0, 1, 2], "test": [4, 5]})
    assert tasks.input_shape == (4, 4, 1) and "val" not in tasks.class_names
    episode = tasks.sample(_seed(0), 3, "val")  # falls back to the test classes
    values = np.concatenate([episode.support_x.numpy().ravel(), episode.query_x.numpy().ravel()])
    assert values.dtype == np.float32 and 0 <= values.min() and values.max() <= 1
    pool = {tuple(image.ravel()): label for image, label in zip(x, y)}
    seen = {pool[tuple(np.round(image.ravel() * 255).astype(np.uint8))]
            for image in episode.query_x.numpy().reshape(-1, 4, 4, 1)}
    assert seen == {4, 5}
    tasks = tasks_lib.array_tasks(x, y, 2, 1, 3, class_split=([0, 1], [2, 3], [4, 5]))
    assert tasks.class_names == {"train": [0, 1], "val": [2, 3], "test": [4, 5]}
    # Numpy arrays of class ids, as users build them (was "truth value of an array is
    # ambiguous").
    tasks = tasks_lib.array_tasks(x, y, 2, 1, 3, class_split={"train": np.arange(3),
                                                              "test": np.array([4, 5])})
    assert tasks.class_names == {"train": [0, 1, 2], "test": [4, 5]}


def test_split_classes():
    parts = tasks_lib.split_classes(range(50), "0.64,0.16,0.2", seed=1)
    assert [len(parts[s]) for s in ("train", "val", "test")] == [32, 8, 10]
    assert sorted(np.concatenate(list(parts.values()))) == list(range(50))
    again = tasks_lib.split_classes(range(50), (0.64, 0.16, 0.2), seed=1)
    assert all(np.array_equal(parts[s], again[s]) for s in parts)
    other = tasks_lib.split_classes(range(50), (0.64, 0.16, 0.2), seed=2)
    assert not np.array_equal(parts["train"], other["train"])
    assert "val" not in tasks_lib.split_classes(range(10), "0.5,0,0.5")
    with pytest.raises(ValueError, match="class_split must be 3 fractions"):
        tasks_lib.split_classes(range(10), "0.5,0.6,0.2")
    with pytest.raises(ValueError, match="not in the data: 99"):
        tasks_lib.split_classes(range(10), {"train": [1, 99], "test": [2]})
    with pytest.raises(ValueError, match="more than one split or twice: 2$"):
        tasks_lib.split_classes(range(10), {"train": [1, 2], "test": [2, 3]})
    # A class twice in one split is named alone (the message listed the whole split).
    with pytest.raises(ValueError, match="more than one split or twice: 3$"):
        tasks_lib.split_classes(range(10), {"train": [1, 2], "test": [4, 3, 5, 3]})


def test_a_repeated_class_is_named_as_the_user_named_it():
    """The message gave positions in the class list: "twice: 5" for the class labelled 150."""
    x, y = _features([4] * 8)
    labels = y * 10 + 100
    with pytest.raises(ValueError, match="more than one split or twice: 150$"):
        tasks_lib.array_tasks(x, labels, 2, 1, 1, class_split={
            "train": [100, 110, 120], "val": [140, 150], "test": [150, 160, 170]})
    # Classes short of a larger k_shot are named in order (the split's are shuffled).
    tasks = tasks_lib.array_tasks(*_features(COUNTS), 2, 1, 1, class_split="0.5,0,0.5")
    short = sorted(c for c, n in zip(tasks.class_names["train"], tasks.counts["train"]) if n < 7)
    assert list(tasks.class_names["train"]) != sorted(tasks.class_names["train"])
    with pytest.raises(ValueError, match=r"class\(es\) have fewer than train_k_shot \+ k_query = "
                       r"7 examples: " + ", ".join(f"{c} \\(\\d\\)" for c in short[:3])):
        tasks.check_k_shot(6, label="train_k_shot")


def test_array_tasks_errors_name_the_problem(caplog):
    x, y = _features(COUNTS)
    with pytest.raises(ValueError, match="x has 50 examples but y has 49 labels"):
        tasks_lib.array_tasks(x[:50], y[:49], 3, 1, 1)
    # Float labels (np.loadtxt's) are taken when they are whole numbers, as fit's are.
    as_float = tasks_lib.array_tasks(x, y.astype(np.float32), 3, 1, 1)
    assert as_float.class_names == tasks_lib.array_tasks(x, y, 3, 1, 1).class_names
    fractional = y.astype(np.float32)
    fractional[7] = 2.5
    with pytest.raises(ValueError, match=r"labels must be integer class ids; the float labels "
                                         r"hold 2.5 \(at index 7\), not a whole number"):
        tasks_lib.array_tasks(x, fractional, 3, 1, 1)
    with pytest.raises(ValueError, match="labels must be integer class ids, got <U1"):
        tasks_lib.array_tasks(x, np.array(["a"] * len(y)), 3, 1, 1)
    with pytest.raises(ValueError, match=r"the val split has 3 classes \(of 20, class_split "
                                         r"'0.64,0.16,0.2'\), fewer than n_way=4"):
        tasks_lib.array_tasks(x, y, 4, 1, 1)
    # Classes with fewer than k_shot + k_query examples are named, or left out on request.
    small = [f"{c} ({n})" for c, n in enumerate(COUNTS) if n < 5][:3]
    with pytest.raises(ValueError, match=r"6 class\(es\) have fewer than k_shot \+ k_query = 5 "
                                         r"examples: " + ", ".join(small).replace("(", r"\(")
                                         .replace(")", r"\)")):
        tasks_lib.array_tasks(x, y, 2, 2, 3)
    tasks = tasks_lib.array_tasks(x, y, 2, 2, 3, drop_small_classes=True)
    assert sum(len(c) for c in tasks.class_names.values()) == 14
    assert min(min(c) for c in tasks.counts.values()) >= 5
    assert "leaving out 6 class(es)" in caplog.text


# -- folders ------------------------------------------------------------------------------------


def _omniglot_pngs(count):
    """PNG bytes of `count` Omniglot characters (lists of drawings), or None without the data."""
    data_dir = os.environ.get(OMNIGLOT_ENV)
    if not data_dir:
        return None
    with zipfile.ZipFile(os.path.join(data_dir, "images_background.zip")) as z:
        names = sorted(n for n in z.namelist() if n.endswith(".png"))
        by_character = {}
        for name in names:
            by_character.setdefault(os.path.dirname(name), []).append(name)
        characters = sorted(by_character)[:count]
        return [[z.read(n) for n in by_character[c]] for c in characters]


def _drawn_pngs(count, size=(40, 40)):
    from PIL import Image, ImageDraw
    rng = np.random.default_rng(0)
    classes = []
    for c in range(count):
        drawings = []
        for _ in range(20):
            image = Image.new("L", size, 255)
            draw = ImageDraw.Draw(image)
            for _ in range(3):
                draw.line([tuple(rng.integers(0, size[0], 2)) for _ in range(2)], fill=c * 10,
                          width=3)
            buffer = io.BytesIO()
            image.save(buffer, "PNG")
            drawings.append(buffer.getvalue())
        classes.append(drawings)
    return classes


def _make_folder(path, num_classes=8, sizes=None):
    """`path/char_NN/NN.png`: classes of unequal sizes (sizes[c] images, default 6..12)."""
    pngs = _omniglot_pngs(num_classes) or _drawn_pngs(num_classes)
    for c, drawings in enumerate(pngs):
        folder = path / f"char_{c:02d}"
        folder.mkdir(parents=True)
        for i, data in enumerate(drawings[:sizes[c] if sizes else 6 + c % 7]):
            (folder / f"{i:02d}.png").write_bytes(data)
    return path


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    return _make_folder(tmp_path_factory.mktemp("own") / "images")


def test_folder_tasks_decode_split_and_cache(image_folder, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    tasks = tasks_lib.folder_tasks(str(image_folder), n_way=2, k_shot=1, k_query=2,
                                   image_size=14, cache_dir=str(cache),
                                   class_split="0.5,0.25,0.25", seed=1)
    assert tasks.input_shape == (14, 14, 1) and tasks.output_size == 2
    names = {s: set(c) for s, c in tasks.class_names.items()}
    assert set().union(*names.values()) == {f"char_{c:02d}" for c in range(8)}
    assert [len(names[s]) for s in ("train", "val", "test")] == [4, 2, 2]
    assert sorted(np.concatenate(list(tasks.counts.values()))) == sorted(6 + c % 7
                                                                        for c in range(8))
    episode = tasks.sample(_seed(0), 3)
    assert episode.support_x.shape == (3, 2, 14, 14, 1) and episode.query_y.shape == (3, 4)
    assert 0 <= episode.query_x.numpy().min() and episode.query_x.numpy().max() <= 1
    assert len(os.listdir(cache)) == 1

    # The cache is used: no decoding the second time, same arrays.
    images, counts, _ = sources.load_folder(str(image_folder), 14, cache_dir=str(cache))

    def no_decoding(*args):
        raise AssertionError("decoded again")

    with monkeypatch.context() as m:
        m.setattr(sources, "_decode_folder", no_decoding)
        cached, cached_counts, names = sources.load_folder(str(image_folder), 14,
                                                           cache_dir=str(cache))
    np.testing.assert_array_equal(images, cached)
    np.testing.assert_array_equal(counts, cached_counts)
    assert names == [f"char_{c:02d}" for c in range(8)] and images.shape[1:] == (14, 14, 1)
    # Unresized, the images keep their size.
    full, _, _ = sources.load_folder(str(image_folder))
    assert full.shape[1:3] in {(105, 105), (40, 40)} and full.shape[3] == 1

    # A changed file is decoded again (new key), and its new content is used.
    changed = image_folder / "char_00" / "00.png"
    original = changed.read_bytes()
    try:
        shutil.copyfile(image_folder / "char_01" / "00.png", changed)
        st = os.stat(changed)
        os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        again, _, _ = sources.load_folder(str(image_folder), 14, cache_dir=str(cache))
    finally:
        changed.write_bytes(original)
    assert len(os.listdir(cache)) == 2  # the old key and the new one
    np.testing.assert_array_equal(again[0], images[counts[0]])


def test_a_home_relative_data_dir_and_cache_dir_are_the_home_directory(image_folder, tmp_path,
                                                                         monkeypatch):
    """`~` in the library's paths means the home directory, as on the command line."""
    home, work = tmp_path / "home", tmp_path / "work"
    shutil.copytree(image_folder, home / "images")
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    tasks = tasks_lib.folder_tasks("~/images", n_way=2, k_shot=1, k_query=2, image_size=14,
                                   cache_dir="~/cache", class_split="0.5,0.25,0.25")
    assert tasks.output_size == 2
    assert len(os.listdir(home / "cache")) == 1
    assert not os.listdir(work)  # no literal "~" folder where it ran


def test_folder_errors_are_clear(image_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder data_dir .*nowhere.* does not "
                                                "exist; expected one sub-folder per class"):
        tasks_lib.folder_tasks(str(tmp_path / "nowhere"), 2, 1, 1)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "stray.png").write_bytes(b"")
    with pytest.raises(ValueError, match="has no class sub-folders"):
        tasks_lib.folder_tasks(str(tmp_path / "empty"), 2, 1, 1)

    bad = tmp_path / "bad"
    shutil.copytree(image_folder, bad)
    (bad / "char_03" / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"char_03/broken.jpg: not a readable image"):
        tasks_lib.folder_tasks(str(bad), 2, 1, 1, image_size=14)
    os.remove(bad / "char_03" / "broken.jpg")

    from PIL import Image
    Image.new("L", (30, 20)).save(bad / "char_05" / "wide.png")
    with pytest.raises(ValueError, match=r"mixed image sizes in .*char_05/wide.png is 30x20.*"
                                         r"pass image_size"):
        tasks_lib.folder_tasks(str(bad), 2, 1, 1)
    tasks = tasks_lib.folder_tasks(str(bad), 2, 1, 1, image_size=(12, 10), channels=3,
                                   class_split="0.5,0.25,0.25")
    assert tasks.input_shape == (12, 10, 3)

    with pytest.raises(ValueError, match=r"the val split has 1 classes \(of 8, class_split "
                                         r"'0.64,0.16,0.2'\), fewer than n_way=2"):
        tasks_lib.folder_tasks(str(image_folder), 2, 1, 1, image_size=14)
    with pytest.raises(ValueError, match=r"8 classes, fewer than n_way=9"):
        tasks_lib.folder_tasks(str(image_folder), 9, 1, 1, image_size=14)
    with pytest.raises(ValueError, match=r"class\(es\) have fewer than k_shot \+ k_query = 8 "
                                         r"examples: char_00 \(6\), char_01 \(7\), char_07 \(6\)"):
        tasks_lib.folder_tasks(str(image_folder), 2, 4, 4, image_size=14)
    # A broken link was a bare "[Errno 2] No such file or directory" with a cache (the
    # CLI's default), where `ls` shows the file.
    broken = tmp_path / "broken"
    shutil.copytree(image_folder, broken)
    os.symlink(tmp_path / "gone.png", broken / "char_01" / "gone.png")
    for cache_dir in (None, str(tmp_path / "cache")):
        with pytest.raises(FileNotFoundError, match=r"char_01/gone.png: a broken link \(to "
                           r"'.*gone.png', which does not exist\); restore its target or "
                           r"remove the link$"):
            tasks_lib.folder_tasks(str(broken), 2, 1, 1, image_size=14, cache_dir=cache_dir)
    with pytest.raises(ValueError, match=r"more than one split or twice: char_02$"):
        tasks_lib.folder_tasks(str(image_folder), 2, 1, 1, image_size=14, class_split={
            "train": ["char_02", "char_03", "char_02"], "test": ["char_04", "char_05"]})


def test_folder_shows_transparent_images_over_white(tmp_path):
    """PIL's conversions drop alpha: without compositing, black strokes on transparent
    black pixels would train on black squares."""
    from PIL import Image, ImageDraw

    def drawing(mode, background, ink):
        image = Image.new(mode, (20, 20), background)
        ImageDraw.Draw(image).line([(2, 2), (17, 12), (4, 17)], fill=ink, width=3)
        return image

    root = tmp_path / "images"
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        drawing("L", 255, 0).save(root / f"c{c}" / "a.png")  # opaque, on white
        drawing("RGBA", (0, 0, 0, 0), (0, 0, 0, 255)).save(root / f"c{c}" / "b.png")
        drawing("LA", (0, 0), (0, 255)).save(root / f"c{c}" / "c.png")
        drawing("L", 0, 0).save(root / f"c{c}" / "d.png", transparency=0)  # tRNS, no alpha
        drawing("RGBA", (0, 0, 0, 0), (0, 0, 0, 128)).save(root / f"c{c}" / "e.png")
        # A GIF's transparency is not composited: TensorFlow's GIF decoder has no alpha.
        drawing("L", 0, 255).save(root / f"c{c}" / "f.gif", transparency=0)
    images, counts, _ = sources.load_folder(str(root), channels=1)  # RGBA would choose 3
    assert images.shape == (12, 20, 20, 1) and counts.tolist() == [6, 6]
    on_white = images[0, ..., 0]
    assert on_white.min() == 0 and np.median(on_white) == 255
    for i in (1, 2):
        np.testing.assert_array_equal(images[i, ..., 0], on_white)
    assert images[3, ..., 0].min() == 255  # every pixel of d.png is transparent: all white
    half = images[4, ..., 0]  # half-transparent black ink: mid-gray strokes
    np.testing.assert_array_equal(half[on_white == 255], 255)
    assert set(np.unique(half[on_white == 0])) == {127}
    np.testing.assert_array_equal(images[5, ..., 0], 255 - on_white)  # as drawn: white ink


def test_folder_turns_jpegs_by_their_exif_orientation(tmp_path):
    """A photo stored sideways (EXIF orientation 6, as phones write it) trains as it is
    shown, and its turned size is the size the mixed-sizes check sees."""
    from PIL import Image
    upright = np.full((30, 20), 255, np.uint8)  # 30 high, 20 wide
    upright[3:8, 2:15] = 0
    upright[8:26, 11:15] = 0
    root = tmp_path / "images"
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        Image.fromarray(upright).save(root / f"c{c}" / "a.png")
        # Stored turned 90 degrees counter-clockwise (20 high, 30 wide); orientation 6 says
        # "turn it 90 degrees clockwise to show it".
        exif = Image.Exif()
        exif[0x0112] = 6
        Image.fromarray(np.ascontiguousarray(np.rot90(upright, 1))).save(
            root / f"c{c}" / "b.jpg", quality=95, exif=exif.tobytes())
        Image.fromarray(np.ascontiguousarray(np.rot90(upright, 1))).save(
            root / f"c{c}" / "c.jpg", quality=95)  # no orientation: shown (and kept) as stored
        # A JPEG holding several pictures (PIL's "MPO"; many phones' photos): the same.
        Image.fromarray(np.ascontiguousarray(np.rot90(upright, 1))).save(
            root / f"c{c}" / "d.jpg", "MPO", save_all=True, quality=95, exif=exif.tobytes(),
            append_images=[Image.fromarray(upright)])
    images, counts, _ = sources.load_folder(str(root), channels=1, image_size=(30, 20))
    assert counts.tolist() == [4, 4]
    png, photo, mpo = (images[i, ..., 0].astype(int) for i in (0, 1, 3))
    assert np.abs(photo - png).max() < 40 and np.abs(photo - png).mean() < 3
    assert np.abs(mpo - png).max() < 40 and np.abs(mpo - png).mean() < 3
    # Without a size to resize to, the turned photo has the PNG's size: one size, no error;
    # the unturned JPEG is 20x30 and is named.
    (root / "c0" / "c.jpg").unlink()
    (root / "c1" / "c.jpg").unlink()
    images, _, _ = sources.load_folder(str(root), channels=1)
    assert images.shape == (6, 30, 20, 1)
    Image.fromarray(np.ascontiguousarray(np.rot90(upright, 1))).save(root / "c1" / "c.jpg")
    with pytest.raises(ValueError, match=r"mixed image sizes in .*c\.jpg is 30x20"):
        sources.load_folder(str(root), channels=1)


def test_folder_scales_16_bit_images_and_refuses_wider_ones(tmp_path):
    from PIL import Image
    gradient = np.tile(np.linspace(0, 65535, 20).astype(np.uint16), (20, 1))
    eight_bit = np.tile(np.round(np.linspace(0, 255, 20)).astype(np.uint8), (20, 1))
    root = tmp_path / "images"
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        Image.fromarray(gradient).save(root / f"c{c}" / "a.png")  # PIL mode I;16
        # The same picture in 8 and 16 bits (v * 257), and a 32-bit one (mode I, in a TIFF).
        Image.fromarray(eight_bit).save(root / f"c{c}" / "b.png")
        Image.fromarray(eight_bit.astype(np.uint16) * 257).save(root / f"c{c}" / "c.png")
        Image.fromarray(eight_bit.astype(np.int32) * 257).save(root / f"c{c}" / "d.png",
                                                               format="TIFF")
    assert Image.open(root / "c0" / "a.png").mode == "I;16"
    assert Image.open(root / "c0" / "d.png").mode == "I"
    images, counts, _ = sources.load_folder(str(root))
    assert images.dtype == np.uint8 and images.shape == (8, 20, 20, 1)
    np.testing.assert_array_equal(images[0, 0, :, 0], np.rint(gradient[0] / 257))
    assert images[0].min() == 0 and images[0].max() == 255  # not clipped at 255
    for i in (1, 2, 3):
        np.testing.assert_array_equal(images[i, ..., 0], eight_bit)

    Image.fromarray(eight_bit.astype(np.int32) * 1000).save(root / "c1" / "e.png", format="TIFF")
    with pytest.raises(ValueError, match=r"c1/e.png: a 32-bit integer image with values in "
                                         r"\[0, 255000\]; expected 8-bit or 16-bit"):
        sources.load_folder(str(root))
    os.remove(root / "c1" / "e.png")
    Image.fromarray(eight_bit.astype(np.float32) / 255).save(root / "c1" / "f.png",
                                                             format="TIFF")
    with pytest.raises(ValueError, match=r"c1/f.png: a floating-point image \(PIL mode F\)"):
        sources.load_folder(str(root))


def test_folder_listing_reads_each_image_once_and_says_what_it_skipped(tmp_path, monkeypatch):
    from PIL import Image
    warnings = []
    monkeypatch.setattr(sources.logging, "warning",
                        lambda message, *args: warnings.append(message % args))
    root = tmp_path / "images"
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8), 40 * i + c, np.uint8)).save(root / f"c{c}" / f"{i}.png")
    # A symlink loop, a second link to the same folder and to the same image, a hidden
    # folder (a notebook's checkpoints) and files that are not images.
    os.symlink(root / "c0", root / "c0" / "loop")
    (root / "c1" / "sub").mkdir()
    os.symlink(root / "c1" / "0.png", root / "c1" / "sub" / "again.png")
    (root / "c1" / ".ipynb_checkpoints").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "c1" / ".ipynb_checkpoints" / "x.png")
    (root / "c0" / "notes.txt").write_text("not an image")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "c0" / "scan.tif")
    # An image_size whose arrays could not fit is refused before anything is decoded.
    with pytest.raises(ValueError, match=r"6 images of 1000000x1000000x1 need \d+\.\d GiB "
                                         r"decoded, more than half of this machine's"):
        sources.load_folder(str(root), image_size=1_000_000, channels=1)
    warnings.clear()
    classes = sources._list_folder(str(root))
    assert classes == [("c0", ["c0/0.png", "c0/1.png", "c0/2.png"]),
                       ("c1", ["c1/0.png", "c1/1.png", "c1/2.png"])]
    assert len(warnings) == 2
    assert "skipped 2 file(s) that are not PNG/JPG/JPEG/BMP/GIF images" in warnings[0]
    assert "skipped 1 link(s) to an image already in its class, e.g. c1/sub/again.png" in (
        warnings[1])
    # Images beside the class folders are not in any class: said, not silently dropped.
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "loose.png")
    warnings.clear()
    assert sources._list_folder(str(root)) == classes
    assert any("ignored 1 image(s) outside the class folders, e.g. loose.png" in w
               for w in warnings)
    # Images in one sub-folder of a class are that class's; in several sub-folders (an
    # alphabet of characters), the merge is said, with what to do.
    (root / "c1" / "scans").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "c1" / "scans" / "3.png")
    warnings.clear()
    assert sources._list_folder(str(root))[1][1][-1] == "c1/scans/3.png"
    assert not any("sub-folders" in w for w in warnings)
    for character in ("character01", "character02"):
        (root / "c0" / character).mkdir()
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "c0" / character / "a.png")
    warnings.clear()
    assert len(sources._list_folder(str(root))[0][1]) == 5  # still one class, as Keras reads
    assert any("1 class folder(s) hold images in several sub-folders, e.g. c0 (2 sub-folders)"
               in w and "give a data_dir whose sub-folders are those classes" in w
               for w in warnings), warnings
    # Non-UTF-8 names (zips made on Windows) key the cache like any other.
    odd = os.fsdecode(b"caf\xe9")
    os.rename(root / "c0", root / odd)
    assert sources._folder_key(str(root), sources._list_folder(str(root)), None, None)


@pytest.mark.parametrize("link", ["class_alias", "link_above_the_class", "image_in_two"])
def test_folder_links_never_put_one_image_in_two_classes(tmp_path, link):
    """A class linked under a second name, a link inside a class to the folder above it, an
    image linked into another class: each made one image a member of two classes, silently
    (a meta-test class could be trained on under its alias). Refused in one line."""
    from PIL import Image
    root = tmp_path / "images"
    for c in range(4):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((8, 8), 40 * i + c, np.uint8)).save(root / f"c{c}" / f"{i}.png")
    if link == "class_alias":
        os.symlink(root / "c0", root / "c9_alias")
    elif link == "link_above_the_class":
        os.symlink(root, root / "c0" / "loop")
    else:
        os.symlink(root / "c1" / "0.png", root / "c2" / "borrowed.png")
    with pytest.raises(ValueError, match=r"image\(s\) are in more than one class through "
                                         r"links, e\.g\. .* \(class c\w+\) is .*every image "
                                         r"must belong to one class folder only"):
        sources.load_folder(str(root))


# -- TFDS ---------------------------------------------------------------------------------------


def _mock_prepared(tfds, monkeypatch):
    """`tfds.testing.mock_data` stands for a prepared dataset but leaves `is_prepared` False,
    which would send the loader to check the (unreachable) download servers."""
    monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)


def test_tfds_tasks_from_mock_data(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=100):
        _mock_prepared(tfds, monkeypatch)
        tasks = tasks_lib.tfds_tasks("mnist", n_way=2, k_shot=1, k_query=2,
                                     data_dir=str(tmp_path), class_split="0.6,0.2,0.2", seed=4)
        assert tasks.input_shape == (28, 28, 1) and tasks.output_size == 2
        assert [len(tasks.class_names[s]) for s in ("train", "val", "test")] == [6, 2, 2]
        assert sum(c.sum() for c in tasks.counts.values()) == 200  # train and test pooled
        episode = tasks.sample(_seed(0), 3, "test")
        assert episode.support_x.shape == (3, 2, 28, 28, 1)
        small = tasks_lib.tfds_tasks("mnist", 2, 1, 2, image_size=14, data_dir=str(tmp_path),
                                     class_split="0.6,0.2,0.2")
        assert small.input_shape == (14, 14, 1)
        # An image_size whose arrays could not fit is refused before resizing, as for folders
        # (on a machine of 1 MiB here, so that a failing check cannot exhaust the real one).
        sizes = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 256}
        monkeypatch.setattr(sources.os, "sysconf",
                            lambda name, real=os.sysconf: sizes.get(name) or real(name))
        with pytest.raises(ValueError, match=r"TFDS mnist: 200 images of 64x64x1 need "
                                             r"\d+\.\d GiB decoded, more than half"):
            tasks_lib.tfds_tasks("mnist", 2, 1, 2, image_size=64, data_dir=str(tmp_path))
    monkeypatch.undo()
    with pytest.raises(ValueError, match="unknown TFDS dataset 'no_such_dataset_xyz'"):
        tasks_lib.tfds_tasks("no_such_dataset_xyz", 2, 1, 1)
    with pytest.raises(FileNotFoundError, match="TFDS mnist: .*could not find data in"):
        tasks_lib.tfds_tasks("mnist", 2, 1, 1, data_dir=str(tmp_path), download=False)


def test_tfds_without_network_fails_at_once_and_says_how_to_use_local_data(tmp_path,
                                                                          monkeypatch, offline):
    """Without network TFDS would retry each file for about four minutes; the loader checks
    the download servers first and fails at once."""
    tfds = pytest.importorskip("tensorflow_datasets")
    attempts = offline
    started = time.monotonic()
    with pytest.raises(ValueError, match=r"TFDS mnist is not prepared in .* and "
                                         r"storage\.googleapis\.com, where TFDS downloads it "
                                         r"from, cannot be reached \(gaierror: .*\)\. Without "
                                         r"network: prepare it on a connected machine"):
        tasks_lib.tfds_tasks("mnist", 2, 1, 1, data_dir=str(tmp_path))
    assert time.monotonic() - started < 30
    assert attempts == [("storage.googleapis.com", 443)]   # one check per server, no retries
    # Behind a proxy a direct connection says nothing: no check, TFDS' own download runs
    # (and its failure is reported as one line too).
    monkeypatch.setattr(urllib.request, "getproxies",
                        lambda: {"https": "http://proxy.invalid:3128"})

    def download_fails(self, *args, **kwargs):
        raise ConnectionError("Max retries exceeded with url: /tfds-data/...")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", download_fails)
    with pytest.raises(ValueError, match=r"TFDS mnist is not prepared in .* and could not be "
                                         r"downloaded \(ConnectionError: Max retries .*\)\. "
                                         r"Without network: prepare it on a connected machine"):
        tasks_lib.tfds_tasks("mnist", 2, 1, 1, data_dir=str(tmp_path))
    assert len(attempts) == 1


def test_a_reachable_server_is_not_an_error(monkeypatch, offline):
    attempts = offline
    assert "gaierror" in downloads.host_unreachable("example.invalid")
    # no_proxy alone is no proxy.
    monkeypatch.setattr(urllib.request, "getproxies", lambda: {"no": "localhost"})
    assert "gaierror" in downloads.host_unreachable("example.invalid")
    assert len(attempts) == 2

    class Connection:
        def __enter__(self):
            return self

        def __exit__(self, *args):
            return False

    monkeypatch.setattr(socket, "create_connection", lambda *args, **kwargs: Connection())
    assert downloads.host_unreachable("example.invalid") is None


def test_tfds_mirror_reachable_leaves_the_download_to_tfds(monkeypatch):
    """TFDS looks for a prepared copy on its Cloud Storage mirror first: where that is
    reachable, the dataset's own servers are not checked (TFDS may not need them)."""
    tfds = pytest.importorskip("tensorflow_datasets")
    checked = []
    monkeypatch.setattr(downloads, "host_unreachable",
                        lambda host, port=443: checked.append(host) or (
                            None if host == downloads.TFDS_MIRROR_HOST else "OSError: down"))
    downloads.check_tfds_downloadable(tfds.builder("omniglot"), "")
    assert checked == [downloads.TFDS_MIRROR_HOST]


def test_config_tfds_reaches_the_loader(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    config = config_lib.Config(dataset="tfds:mnist", data_dir=str(tmp_path), n_way=3, k_shot=1,
                               k_query=1, image_size=8, class_split="0.4,0.3,0.3").validate()
    assert config.model_name == "conv4"
    with tfds.testing.mock_data(num_examples=60):
        _mock_prepared(tfds, monkeypatch)
        tasks = tasks_lib.build(config)
    assert tasks.input_shape == (8, 8, 1)
    assert [len(tasks.class_names[s]) for s in ("train", "val", "test")] == [4, 3, 3]


# -- functions ----------------------------------------------------------------------------------


def _line(seed):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (12, 2))
    return x, x @ rng.normal(size=(2, 1)) + seed % 3


def test_function_tasks():
    tasks = tasks_lib.FunctionTasks(_line, k_shot=4, k_query=6)
    assert tasks.input_shape == (2,) and tasks.output_size == 1 and not tasks.is_classification
    episode = tasks.sample(_seed(7), 5)
    assert [tuple(t.shape) for t in episode] == [(5, 4, 2), (5, 4, 1), (5, 6, 2), (5, 6, 1)]
    sx, sy, qx, qy = (t.numpy() for t in episode)
    for t in range(5):  # one function per task: support and query rows of the same line
        w, *_ = np.linalg.lstsq(np.c_[sx[t], np.ones(4)], sy[t], rcond=None)
        np.testing.assert_allclose(np.c_[qx[t], np.ones(6)] @ w, qy[t], atol=1e-4)
    mapped = next(iter(tf.data.Dataset.from_tensors(_seed(7)).map(lambda s: tasks.sample(s, 5))))
    for a, b in zip(episode, mapped):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(sx, tasks.sample(_seed(8), 5).support_x)
    assert tasks.sample(_seed(7), 2, k_shot=6).support_x.shape == (2, 6, 2)
    # Eagerly the function's own ValueError; in a graph, TensorFlow's error holds its one line.
    with pytest.raises(ValueError, match=r"^_line\(\d+\) returned 12 rows, fewer than k_shot "
                                         r"\+ k_query = 13$"):
        tasks.sample(_seed(7), 2, k_shot=7)
    with pytest.raises(tf.errors.OpError) as e:
        next(iter(tf.data.Dataset.from_tensors(_seed(7)).map(
            lambda s: tasks.sample(s, 2, k_shot=7))))
    assert re.fullmatch(r"_line\(\d+\) returned 12 rows, fewer than k_shot \+ k_query = 13",
                        sources.user_error(e.value))
    assert "Traceback" not in str(e.value)

    def fails_later(seed):
        if seed:
            raise KeyError(seed)
        return _line(seed)

    def other_shape(seed):
        x, y = _line(seed)
        return (x, y) if seed == 0 else (x[:, :1], y)

    for function, pattern in ((fails_later, r"fails_later\((\d+)\) raised KeyError: \1$"),
                              (other_shape, r"other_shape\(\d+\) returned x \(12, 1\) and y "
                                            r"\(12, 1\); expected rows of shape \(2,\) and "
                                            r"\(1,\) as other_shape\(0\) returned$")):
        with pytest.raises(ValueError, match="^" + pattern):
            tasks_lib.FunctionTasks(function, k_shot=4, k_query=6).sample(_seed(7), 2)
    with pytest.raises(ValueError, match=r"_line\(0\) returned 12 rows, fewer than k_shot \+ "
                                         "k_query = 20"):
        tasks_lib.FunctionTasks(_line, k_shot=10, k_query=10)
    # Checked when built (seed 0): rows that are not arrays, or not real numbers.
    for returned, pattern in (
            ((np.zeros((12, 2)), [[1.0], [2.0, 3.0]]), "rows that are not arrays"),
            ((np.zeros((12, 2)), np.array(["a"] * 12)), "y of dtype <U1"),
            ((np.zeros((12, 2)) * 1j, np.zeros(12)), "x of dtype complex128")):
        with pytest.raises(ValueError, match=r"^<lambda>\(0\) returned " + pattern):
            tasks_lib.FunctionTasks(lambda seed, r=returned: r, k_shot=4, k_query=6)

    splits = []

    def by_split(seed, split):
        splits.append(split)
        return _line(seed)

    tasks = tasks_lib.FunctionTasks(by_split, k_shot=2, k_query=2)
    tasks.sample(_seed(1), 2, "test")
    assert splits == ["train", "test", "test"]


# -- config and command line --------------------------------------------------------------------


def test_config_own_data_fields():
    config_lib.Config(dataset="tfds:emnist/balanced").validate()
    config_lib.Config(dataset="folder", data_dir="/x", image_size=32, class_split="0.7,0,0.3",
                      image_channels=3).validate()
    config_lib.Config(dataset="custom").validate()
    for bad, message in ((dict(dataset="tfds:"), "dataset must be one of"),
                         (dict(dataset="folder"), "dataset folder needs data_dir"),
                         (dict(class_split="0.5,0.5"), "class_split must be 3 fractions"),
                         (dict(class_split="0,0.5,0.5"), "class_split must be 3 fractions"),
                         (dict(image_size=-1), "image_size must be a non-negative integer"),
                         (dict(image_channels=2), "image_channels must be 0")):
        with pytest.raises(ValueError, match=message):
            config_lib.Config(**bad).validate()
    # One problem, one message: a misspelt dataset was also told its class_split was ignored,
    # a negative n_way also that it must be at least 2.
    for bad, message in ((dict(dataset="Folder", class_split="0.5,0.25,0.25"),
                          r"got 'Folder'$"),
                         (dict(dataset="folder", data_dir="/x", n_way=-2),
                          r"^n_way must be a positive integer, got -2$")):
        with pytest.raises(ValueError, match=message):
            config_lib.Config(**bad).validate()
    folder = config_lib.Config(dataset="folder", data_dir="/x")
    with pytest.raises(ValueError, match="the input shape is known only from the data"):
        tasks_lib.spec(folder)
    assert tasks_lib.spec(folder, input_shape=(8, 8, 1)).output_size == 5
    custom = config_lib.Config(dataset="custom")
    with pytest.raises(ValueError, match="dataset custom: the task family is given in code"):
        tasks_lib.build(custom)
    with pytest.raises(ValueError, match="pass is_classification"):
        tasks_lib.spec(custom, input_shape=(3,))
    assert tasks_lib.spec(custom, (3,), 1, False).output_size == 1
    assert custom.model_for((3,)) == "mlp" and custom.model_for((8, 8, 3)) == "conv4"
    assert folder.model_name == "conv4"
    assert config_lib.Config(dataset="custom", model="fc").model_for((3,)) == "fc"


def _run(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=600)


def test_cli_trains_on_a_folder_and_exports_without_it(image_folder, tmp_path):
    data = shutil.copytree(image_folder, tmp_path / "data")
    model_dir = tmp_path / "run"
    common = ["--dataset=folder", f"--cache_dir={tmp_path / 'cache'}", "--image_size=14",
              "--n_way=2", "--k_shot=1", "--k_query=1", "--class_split=0.5,0.25,0.25"]
    # Bad data first: one line, exit 1, nothing written to model_dir.
    (data / "char_02" / "broken.png").write_bytes(b"\x89PNG broken")
    result = _run("tf_maml.train", f"--data_dir={data}", f"--model_dir={model_dir}", *common,
                  "--num_iterations=2")
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "char_02/broken.png: not a readable image" in result.stderr
    assert "Traceback" not in result.stderr
    assert not model_dir.exists() or not os.listdir(model_dir)
    os.remove(data / "char_02" / "broken.png")

    result = _run("tf_maml.train", f"--data_dir={data}", f"--model_dir={model_dir}", *common,
                  "--num_iterations=2", "--meta_batch_size=2", "--log_every=1",
                  "--checkpoint_every=2", "--validate_every=0", "--noevaluate")
    assert result.returncode == 0, result.stderr
    spec = tasks_lib.TaskSpec((14, 14, 1), 2, True)
    from tf_maml import config as config_lib
    from tf_maml import experiment as experiment_lib
    saved = config_lib.load(str(model_dir))
    assert vars(experiment_lib.load_spec(str(model_dir), saved)) == vars(spec)

    pngs = [(data / f"char_0{c}" / "00.png").read_bytes() for c in range(3)]
    # What training decoded for those files (each class's first file).
    images, counts, _ = sources.load_folder(str(data), 14)
    firsts = np.concatenate([[0], np.cumsum(counts)[:-1]])[:3]
    trained_on = images[firsts] / np.float32(255)
    shutil.rmtree(data)  # export needs no data
    export_dir = tmp_path / "export"
    result = _run("tf_maml.export", f"--model_dir={model_dir}", f"--export_dir={export_dir}")
    assert result.returncode == 0, result.stderr
    assert "exported step 2" in result.stdout
    loaded = tf.saved_model.load(str(export_dir / "2"))
    rng = np.random.default_rng(0)
    out = loaded.signatures["adapt"](
        support_x=tf.constant(rng.uniform(size=(2, 14, 14, 1)), tf.float32),
        support_y=tf.constant([0, 1], tf.int32),
        query_x=tf.constant(rng.uniform(size=(3, 14, 14, 1)), tf.float32))
    assert out["probabilities"].shape == (3, 2)
    # Image signatures: encoded images decoded (and resized to 14x14) as training did:
    # grayscale, ink as in the files, [0, 1]; TF's Lanczos resize against PIL's.
    decoded = loaded.signatures["decode_images"](images=tf.constant(pngs))["x"].numpy()
    assert decoded.shape == trained_on.shape == (3, 14, 14, 1)
    assert np.abs(decoded - trained_on).max() < 0.25, np.abs(decoded - trained_on).max()
    assert np.abs(decoded - trained_on).mean() < 0.01, np.abs(decoded - trained_on).mean()
    out = loaded.signatures["adapt_images"](support_images=tf.constant(pngs[:2]),
                                            support_y=tf.constant([0, 1], tf.int32),
                                            query_images=tf.constant(pngs))
    want = loaded.signatures["adapt"](support_x=tf.constant(decoded[:2]),
                                      support_y=tf.constant([0, 1], tf.int32),
                                      query_x=tf.constant(decoded))
    np.testing.assert_allclose(out["probabilities"], want["probabilities"], atol=1e-5)


def test_custom_tasks_train_and_restore_without_them(tmp_path):
    from tf_maml import experiment as experiment_lib
    from tf_maml import trainer
    config = config_lib.Config(dataset="custom", k_shot=4, k_query=6, num_iterations=3,
                               meta_batch_size=2, log_every=1, checkpoint_every=3,
                               validate_every=0, num_eval_steps=1)
    tasks = tasks_lib.FunctionTasks(_line, k_shot=4, k_query=6)
    with pytest.raises(ValueError, match="dataset custom: the task family is given in code"):
        trainer.train(config, str(tmp_path / "none"))
    assert not (tmp_path / "none").exists()
    experiment, step = trainer.train(config, str(tmp_path / "run"), tasks=tasks)
    assert step == 3 and experiment.spec.input_shape == (2,)
    restored, step = experiment_lib.restore(str(tmp_path / "run"))
    assert step == 3 and restored.spec.input_shape == (2,) and not restored.spec.is_classification
    for a, b in zip(experiment.model.weights, restored.model.weights):
        np.testing.assert_array_equal(a, b)


def test_validation_episodes_without_validation_classes_say_they_are_test_tasks(monkeypatch):
    """`Episodes(split="val")` on a family without validation classes draws meta-test tasks
    (as the CLI does, which says so): a model picked on them is picked on test data."""
    from tf_maml import keras_face
    warnings = []
    monkeypatch.setattr(keras_face.logging, "warning",
                        lambda message, *args: warnings.append(message % args))
    x, y = _features(COUNTS)
    no_val = tasks_lib.array_tasks(x, y, 2, 1, 1, class_split=(range(10), [], range(10, 20)))
    keras_face.Episodes(no_val, 2, split="val")
    assert len(warnings) == 1 and "tasks of its meta-test classes" in warnings[0]
    keras_face.Episodes(no_val, 2, split="test")
    keras_face.Episodes(tasks_lib.array_tasks(x, y, 2, 1, 1), 2, split="val")  # has val classes
    assert len(warnings) == 1


def test_an_export_evaluated_on_other_data_is_refused(tmp_path):
    """evaluate --saved_model checks the data against the run's, as evaluate --model_dir does:
    an added class would redraw the class split (training classes in the meta-test)."""
    from tf_maml import reporting, trainer
    data = _make_folder(tmp_path / "images")
    run = tmp_path / "run"
    config = config_lib.Config(dataset="folder", data_dir=str(data), n_way=2, k_shot=1,
                               k_query=2, image_size=14, class_split="0.5,0.25,0.25",
                               meta_batch_size=2, num_iterations=2, log_every=1,
                               checkpoint_every=2, validate_every=0, num_eval_steps=1,
                               num_eval_tasks=4, cache_dir=str(tmp_path / "cache"))
    trainer.train(config, str(run))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    exported = subprocess.run([sys.executable, "-m", "tf_maml.export", f"--model_dir={run}",
                               f"--export_dir={tmp_path / 'export'}"],
                              capture_output=True, text=True, env=env, timeout=300)
    assert exported.returncode == 0, exported.stderr
    assert reporting.evaluate_export(str(tmp_path / "export"))["num_tasks"] == 4
    shutil.copytree(data / "char_00", data / "char_99")
    with pytest.raises(ValueError, match=r"is not the data the run exported to .* was trained "
                                         r"on \(.*classes"):
        reporting.evaluate_export(str(tmp_path / "export"))
