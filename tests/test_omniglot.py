"""Omniglot: the real archives, the folder layout, TFDS, episodes, bad data, and learning.

Tests on the real archives read their directory from TF_MAML_OMNIGLOT_DIR (.ci/run sets it;
the `omniglot_dir` and `omniglot_characters` fixtures in conftest.py); they are skipped when it
is unset and fail when it is set but the files are missing.
"""

import glob
import io
import os
import time
import zipfile

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tf_maml import config as config_lib
from tf_maml import reporting, trainer
from tf_maml import tasks as tasks_lib
from tf_maml.tasks import ImageClassTasks, omniglot


def test_real_archives_decode_to_the_paper_format(omniglot_characters):
    images, background = omniglot_characters
    assert images.shape == (1623, 20, 28, 28, 1) and images.dtype == np.uint8
    assert background.sum() == 964
    # Inverted: ink is bright, the page dark; every drawing has some ink.
    assert images.mean() < 40
    assert (images.reshape(1623 * 20, -1).max(axis=1) > 128).all()


def test_paper_and_lake_splits(omniglot_characters):
    _, background = omniglot_characters
    train, test = omniglot.split_characters(background, "paper", seed=0)
    assert len(train) == 1200 and len(test) == 423 and not set(train) & set(test)
    again, _ = omniglot.split_characters(background, "paper", seed=0)
    other, _ = omniglot.split_characters(background, "paper", seed=1)
    np.testing.assert_array_equal(train, again)
    assert set(other) != set(train)
    # "irrespective of alphabet": both archives contribute to training.
    assert 0 < background[train].sum() < 1200
    train, test = omniglot.split_characters(background, "lake")
    assert len(train) == 964 and len(test) == 659
    # The original code's validation: 100 of the 1200 training characters held out.
    paper_train, paper_test = omniglot.split_characters(background, "paper", seed=0)
    train, val = omniglot.hold_out_validation(paper_train, 100, seed=0)
    assert len(train) == 1100 and len(val) == 100
    assert sorted(set(train) | set(val)) == sorted(paper_train) and not set(val) & set(paper_test)


def test_validation_characters_are_held_out_of_meta_training(tmp_path):
    _fake_archives(str(tmp_path))   # 6 background and 6 evaluation characters
    images, _ = omniglot.load_characters(str(tmp_path))
    tasks = omniglot.omniglot_tasks(2, 1, 1, data_dir=str(tmp_path), split="lake",
                                    validation_characters=2, rotate_train=False)
    assert tasks.num_classes == {"train": 4, "val": 2, "test": 6}

    def characters(split):
        episode = tasks.sample(tf.constant([3, 4], tf.int64), 40, split)
        drawings = np.rint(episode.support_x.numpy() * 255).astype(np.uint8).reshape(-1, 28, 28)
        return {c for drawing in drawings for c in range(len(images))
                if any(np.array_equal(drawing, d[..., 0]) for d in images[c])}

    train, val, test = characters("train"), characters("val"), characters("test")
    assert len(val) == 2 and train <= set(range(6)) - val and test <= set(range(6, 12))
    # Without held-out characters validation falls back to the meta-test characters.
    plain = omniglot.omniglot_tasks(2, 1, 1, data_dir=str(tmp_path), split="lake",
                                    rotate_train=False)
    assert plain.num_classes == {"train": 6, "test": 6}
    with pytest.raises(ValueError, match="fewer than n_way=3"):
        omniglot.omniglot_tasks(3, 1, 1, data_dir=str(tmp_path), split="lake",
                                validation_characters=2)
    with pytest.raises(ValueError, match="must be in \\[0, 6\\)"):
        omniglot.hold_out_validation(np.arange(6), 6)
    again, _ = omniglot.hold_out_validation(np.arange(50), 10, seed=4)
    np.testing.assert_array_equal(again, omniglot.hold_out_validation(np.arange(50), 10, 4)[0])


def test_meta_training_learns_real_omniglot(omniglot_dir, omniglot_cache_dir, tmp_path):
    """A few hundred iterations of 5-way 1-shot reach accuracy far above chance (20%)."""
    config = config_lib.Config(
        dataset="omniglot", data_dir=omniglot_dir, cache_dir=omniglot_cache_dir, n_way=5,
        k_shot=1, k_query=5, meta_batch_size=32, num_inner_steps=1, inner_lr=0.4,
        meta_lr=0.003, num_iterations=300, log_every=100, checkpoint_every=1000,
        validate_every=0, num_eval_tasks=200, num_eval_steps=3)
    trainer.train(config, str(tmp_path / "run"))
    results = reporting.evaluate_and_report(str(tmp_path / "run"))
    mean, ci = results["MAML"]
    print("5-way 1-shot accuracy after 0..3 steps:", mean, "±", ci)
    assert mean[0] < 0.3                      # before adaptation: chance
    assert mean[-1] - ci[-1] >= 0.80          # held-out characters, after 3 steps


def _png(array, one_bit=False):
    buffer = io.BytesIO()
    image = Image.fromarray(array)
    (image.convert("1") if one_bit else image).save(buffer, format="PNG")
    return buffer.getvalue()


def _fake_archives(root, alphabets=2, characters=3, drawings=20, as_zip=True, bad_name=None,
                   seed=0, one_bit=False):
    """Writes a tiny Omniglot in Lake's layout: black strokes on white, 105x105.

    `one_bit`: 1-bit PNGs, as Lake's are (the default, 8-bit grey, decodes alike).
    """
    rng = np.random.default_rng(seed)
    for archive in omniglot.ARCHIVES:
        files = {}
        for a in range(alphabets):
            for c in range(characters):
                for d in range(drawings):
                    image = np.full((105, 105), 255, np.uint8)
                    image[rng.integers(0, 90):, rng.integers(0, 90)] = 0
                    name = f"{archive}/Alpha{a}/character{c + 1:02d}/{c:04d}_{d + 1:02d}.png"
                    files[name] = _png(image, one_bit)
        if bad_name:
            files[bad_name] = _png(np.zeros((5, 5), np.uint8))
        if as_zip:
            with zipfile.ZipFile(os.path.join(root, archive + ".zip"), "w") as z:
                for name, data in files.items():
                    z.writestr(name, data)
        else:
            for name, data in files.items():
                path = os.path.join(root, name)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as f:
                    f.write(data)


def test_zip_and_folder_layouts_load_identically(tmp_path):
    (tmp_path / "zips").mkdir()
    (tmp_path / "folders").mkdir()
    _fake_archives(str(tmp_path / "zips"))
    _fake_archives(str(tmp_path / "folders"), as_zip=False)
    a, background = omniglot.load_characters(str(tmp_path / "zips"))
    b, _ = omniglot.load_characters(str(tmp_path / "folders"))
    assert a.shape == (12, 20, 28, 28, 1) and background.sum() == 6
    np.testing.assert_array_equal(a, b)
    # Cached: a second load reads the .npz.
    cache = str(tmp_path / "cache")
    c, _ = omniglot.load_characters(str(tmp_path / "zips"), cache)
    assert len(os.listdir(cache)) == 1
    d, _ = omniglot.load_characters(str(tmp_path / "zips"), cache)
    np.testing.assert_array_equal(c, d)
    np.testing.assert_array_equal(a, d)


def test_cache_dir_that_is_a_file_is_refused_before_decoding(tmp_path, monkeypatch):
    """`--cache_dir` naming a file fails at once in one line, not with "[Errno 17] File exists"
    after seconds of decoding; a cache that cannot be written is skipped with a warning."""
    _fake_archives(str(tmp_path))
    not_a_dir = tmp_path / "cache_file"
    not_a_dir.write_text("")
    decoded = []
    monkeypatch.setattr(omniglot, "_read_archive",
                        lambda *a, real=omniglot._read_archive: decoded.append(1) or real(*a))
    config = config_lib.Config(dataset="omniglot", data_dir=str(tmp_path), n_way=5, k_shot=1,
                               k_query=1, cache_dir=str(not_a_dir))
    with pytest.raises(ValueError, match="cache_dir .*cache_file' is a file, not a directory"):
        tasks_lib.build(config)
    assert not decoded
    # Unwritable (a path under that file): the data is decoded and used, the cache skipped.
    unwritable = str(not_a_dir / "sub")
    images, _ = omniglot.load_characters(str(tmp_path), unwritable)
    assert decoded and images.shape == (12, 20, 28, 28, 1)


def test_train_k_shot_too_large_is_named_as_such(tmp_path):
    """A `train_k_shot` the meta-training classes cannot supply is refused when the data is
    loaded, naming `train_k_shot` (the user's k_shot is fine), not at the first step."""
    _fake_archives(str(tmp_path))
    config = config_lib.Config(dataset="omniglot", data_dir=str(tmp_path), n_way=2, k_shot=1,
                               k_query=5, train_k_shot=16, omniglot_split="lake",
                               omniglot_validation_characters=2)
    with pytest.raises(ValueError, match=r"20 examples per class, fewer than train_k_shot \+ "
                                         r"k_query = 21"):
        tasks_lib.build(config)
    assert tasks_lib.build(config_lib.Config(**dict(config.to_dict(), train_k_shot=15)))


def test_nearest_resize_is_the_reptile_loaders(tmp_path, monkeypatch):
    """`resize_filter="nearest"` decodes a 1-bit drawing as Reptile's loader does (inverted)."""
    _fake_archives(str(tmp_path), alphabets=1, characters=2, as_zip=False, one_bit=True)
    cache = str(tmp_path / "cache")
    nearest, _ = omniglot.load_characters(str(tmp_path), cache, resize_filter="nearest")
    files = sorted(glob.glob(str(tmp_path / "images_*" / "*" / "*" / "*.png")))
    assert len(files) == nearest.shape[0] * 20
    for index, file in enumerate(files):
        with Image.open(file) as image:
            assert image.mode == "1"
            # The Reptile code's loader: PIL's default resize of the 1-bit image, 1.0 = page.
            reptile = np.array(image.resize((28, 28))).astype("float32")
        np.testing.assert_array_equal(nearest[index // 20, index % 20, ..., 0],
                                      (255 * (1 - reptile)).astype(np.uint8))
    # Binary, where Lanczos (the default, MAML's preprocessing) leaves grey edges.
    lanczos, _ = omniglot.load_characters(str(tmp_path), cache)
    assert set(np.unique(nearest)) == {0, 255} and len(np.unique(lanczos)) > 2
    # Each filter has its own cache entry, and each entry serves its own filter.
    assert len(os.listdir(cache)) == 2
    calls = _counting_decoder(monkeypatch)
    np.testing.assert_array_equal(
        omniglot.load_characters(str(tmp_path), cache, resize_filter="nearest")[0], nearest)
    np.testing.assert_array_equal(omniglot.load_characters(str(tmp_path), cache)[0], lanczos)
    assert not calls
    with pytest.raises(ValueError, match="resize_filter must be one of lanczos, nearest"):
        omniglot.load_characters(str(tmp_path), resize_filter="bilinear")
    with pytest.raises(ValueError, match="omniglot_resize_filter must be one of"):
        config_lib.Config(dataset="omniglot", omniglot_resize_filter="Nearest").validate()
    with pytest.raises(ValueError, match="applies to omniglot only"):
        config_lib.Config(dataset="sine", omniglot_resize_filter="nearest").validate()


def test_tfds_source_without_network(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    def as_dataset(self, split, **kwargs):
        labels = np.repeat(range(4) if split == "train" else range(4, 6), 20).astype(np.int64)
        images = np.full((len(labels), 105, 105, 3), 255, np.uint8)
        images[:, 30:75, 45:60] = 0
        return tf.data.Dataset.from_tensor_slices({
            "image": images, "label": labels, "alphabet": labels // 2,
            "alphabet_char_id": labels % 2})

    with tfds.testing.mock_data(as_dataset_fn=as_dataset):
        # mock_data stands for a prepared dataset but leaves is_prepared False.
        monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)
        images, background = omniglot.load_characters(None)
    assert images.shape == (6, 20, 28, 28, 1) and background.tolist() == [True] * 4 + [False] * 2
    assert images[:, :, 14, 14].min() > 200 and images[:, :, 2, 2].max() == 0


def test_tfds_source_without_network_fails_at_once(monkeypatch, offline):
    """Without data_dir and without network, Omniglot's TFDS download would retry for about
    four minutes; the loader checks GitHub first and says at once what to pass instead."""
    import tensorflow_datasets as tfds
    monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: False)
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare",
                        lambda self, *a, **k: pytest.fail("downloaded without network"))
    with pytest.raises(ValueError, match=r"TFDS omniglot is not prepared in .* and github\.com, "
                                         r"where TFDS downloads it from, cannot be reached .*"
                                         r"Pass data_dir \(--data_dir\): a directory with "
                                         r"Lake's images_background\.zip"):
        omniglot.load_characters(None)
    # TFDS' Cloud Storage mirror first, then the dataset's own server; once each.
    assert offline == [("storage.googleapis.com", 443), ("github.com", 443)]


def _lake_layout(root, seed=0):
    """A tiny Omniglot exactly as Lake et al. publish it: 1-bit 105x105 PNGs named
    `<global character number>_<drawing>.png`, numbered in an order that is not the
    alphabetical order of the alphabets (as in the real archives), as zips in `root/zips`
    and extracted in `root/extracted/<archive>/<archive>` (what TFDS' download gives)."""
    rng = np.random.default_rng(seed)
    layout = {"images_background": ("Zeta", "Alpha"), "images_evaluation": ("Mu", "Beta")}
    number = 0
    os.makedirs(os.path.join(root, "zips"))
    for archive, alphabets in layout.items():
        with zipfile.ZipFile(os.path.join(root, "zips", archive + ".zip"), "w") as z:
            for alphabet in alphabets:
                for character in range(1, 3 if alphabet != "Mu" else 4):
                    number += 1
                    for drawing in range(1, 21):
                        ink = np.zeros((105, 105), bool)
                        for _ in range(3):   # strokes: distinct for every drawing
                            r, c = rng.integers(5, 80, 2)
                            ink[r:r + rng.integers(5, 25), c:c + rng.integers(2, 6)] = True
                        buffer = io.BytesIO()
                        Image.fromarray(~ink).save(buffer, format="PNG")   # mode "1", ink black
                        name = (f"{archive}/{alphabet}/character{character:02d}/"
                                f"{number:04d}_{drawing:02d}.png")
                        z.writestr(name, buffer.getvalue())
                        path = os.path.join(root, "extracted", archive, name)
                        os.makedirs(os.path.dirname(path), exist_ok=True)
                        with open(path, "wb") as f:
                            f.write(buffer.getvalue())
    return number


def test_tfds_source_equals_the_archives(tmp_path, monkeypatch):
    """TFDS' own `omniglot` builder, run offline on the same archives, gives the same
    characters in the same order (hence the same "paper" split), with identical pixels."""
    from unittest import mock

    import tensorflow_datasets as tfds
    from tensorflow_datasets.image_classification import omniglot as tfds_omniglot

    root = str(tmp_path)
    num_characters = _lake_layout(root)
    extracted = {"train": "images_background", "eval": "images_evaluation",
                 "small1": "images_background", "small2": "images_background"}
    downloads = mock.MagicMock()
    downloads.download_and_extract.side_effect = lambda urls: {
        k: os.path.join(root, "extracted", extracted[k]) for k in urls}
    # The builder hard-codes the real class and alphabet counts.
    monkeypatch.setattr(tfds_omniglot, "_NUM_CLASSES", num_characters)
    monkeypatch.setattr(tfds_omniglot, "_NUM_ALPHABETS", 4)
    monkeypatch.setattr(tfds.core.DatasetBuilder, "_make_download_manager",
                        lambda self, **kwargs: downloads)
    tfds_dir = os.path.join(root, "tfds")
    tfds.builder("omniglot", data_dir=tfds_dir).download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    load, builder = tfds.load, tfds.builder
    monkeypatch.setattr(tfds, "load", lambda *args, **kwargs: load(
        *args, data_dir=tfds_dir, download=False, **kwargs))
    monkeypatch.setattr(tfds, "builder", lambda *args, **kwargs: builder(
        *args, data_dir=tfds_dir, **kwargs))

    from_tfds, tfds_background = omniglot.load_characters(None)
    from_zip, zip_background = omniglot.load_characters(os.path.join(root, "zips"))
    assert from_zip.shape == from_tfds.shape == (num_characters, 20, 28, 28, 1)
    assert zip_background.tolist() == tfds_background.tolist() == [True] * 4 + [False] * 5
    # Character by character (alphabet by alphabet), the same 20 drawings, pixel for pixel;
    # TFDS keeps no drawing number, so their order within a character may differ.
    for i in range(num_characters):
        assert (sorted(d.tobytes() for d in from_zip[i])
                == sorted(d.tobytes() for d in from_tfds[i])), f"character {i} differs"
    # The drawings are distinct, so the comparison above could tell characters apart.
    assert len({d.tobytes() for d in from_zip.reshape(-1, 28, 28)}) == num_characters * 20


def _counting_decoder(monkeypatch):
    calls = []
    decode = omniglot._decode

    def counted(data, path, resize_filter):
        calls.append(path)
        return decode(data, path, resize_filter)

    monkeypatch.setattr(omniglot, "_decode", counted)
    return calls


def _rewrite_zip_same_size(path):
    """Different content, same entry names and the same file size: among entries of equal
    length (stored uncompressed), each gets the next one's PNG bytes."""
    with zipfile.ZipFile(path) as z:
        entries = [(info.filename, z.read(info.filename)) for info in z.infolist()]
    by_length = {}
    for name, data in entries:
        by_length.setdefault(len(data), []).append(name)
    content = dict(entries)
    for names in by_length.values():
        content.update(zip(names, [content[n] for n in names[1:] + names[:1]]))
    assert content != dict(entries)
    with zipfile.ZipFile(path, "w") as z:
        for name, _ in entries:
            z.writestr(name, content[name])


def test_cache_is_read_and_follows_changes_of_the_archives(tmp_path, monkeypatch):
    source, cache = str(tmp_path / "zips"), str(tmp_path / "cache")
    os.makedirs(source)
    # Constant images: many PNGs of equal length (see _rewrite_zip_same_size).
    for archive in omniglot.ARCHIVES:
        with zipfile.ZipFile(os.path.join(source, archive + ".zip"), "w") as z:
            for c in range(3):
                for d in range(20):
                    z.writestr(f"{archive}/A/character{c + 1:02d}/{c:04d}_{d + 1:02d}.png",
                               _png(np.full((105, 105), 10 * c + d, np.uint8)))
    background_zip = os.path.join(source, "images_background.zip")
    second = 1_700_000_000 * 10**9
    os.utime(background_zip, ns=(second, second))
    calls = _counting_decoder(monkeypatch)

    first, _ = omniglot.load_characters(source, cache)
    assert len(calls) == 120 and len(os.listdir(cache)) == 1
    # A second load reads the cache: nothing is decoded.
    again, _ = omniglot.load_characters(source, cache)
    assert len(calls) == 120
    np.testing.assert_array_equal(again, first)

    # New content, same name, same size, modified within the same second: decoded again.
    size = os.path.getsize(background_zip)
    _rewrite_zip_same_size(background_zip)
    os.utime(background_zip, ns=(second + 1000, second + 1000))
    assert os.path.getsize(background_zip) == size
    changed, _ = omniglot.load_characters(source, cache)
    assert len(calls) == 240
    assert not np.array_equal(changed, first)
    np.testing.assert_array_equal(changed, omniglot.load_characters(source)[0])

    # A different size with the old modification times: decoded again too.
    times = {p: os.stat(p).st_mtime_ns for p in glob.glob(os.path.join(source, "*.zip"))}
    _fake_archives(source, alphabets=1, seed=1)
    for p, mtime in times.items():
        os.utime(p, ns=(mtime, mtime))
    assert os.path.getsize(background_zip) != size
    resized, _ = omniglot.load_characters(source, cache)
    np.testing.assert_array_equal(resized, omniglot.load_characters(source)[0])
    assert not np.array_equal(resized, changed)
    # And each version's cache still serves it.
    calls.clear()
    np.testing.assert_array_equal(omniglot.load_characters(source, cache)[0], resized)
    assert not calls


def test_folder_cache_follows_a_changed_drawing(tmp_path, monkeypatch):
    _fake_archives(str(tmp_path), alphabets=1, characters=1, as_zip=False)
    cache = str(tmp_path / "cache")
    first, _ = omniglot.load_characters(str(tmp_path), cache)
    drawing = tmp_path / "images_evaluation" / "Alpha0" / "character01" / "0000_07.png"
    drawing.write_bytes(_png(np.zeros((105, 105), np.uint8)))
    calls = _counting_decoder(monkeypatch)
    changed, _ = omniglot.load_characters(str(tmp_path), cache)
    assert len(calls) == 40
    assert changed[1, 6].min() == 255 and first[1, 6].min() < 255
    np.testing.assert_array_equal(np.delete(changed, 6, axis=1), np.delete(first, 6, axis=1))


def test_truncated_cache_is_rebuilt(tmp_path, monkeypatch):
    _fake_archives(str(tmp_path), alphabets=1, characters=1)
    cache = str(tmp_path / "cache")
    expected, _ = omniglot.load_characters(str(tmp_path), cache)
    (name,) = os.listdir(cache)
    path = os.path.join(cache, name)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    calls = _counting_decoder(monkeypatch)
    images, background = omniglot.load_characters(str(tmp_path), cache)
    assert len(calls) == 40
    np.testing.assert_array_equal(images, expected)
    assert background.tolist() == [True, False]
    # Rebuilt in place: the next load reads it.
    assert os.listdir(cache) == [name]
    np.testing.assert_array_equal(omniglot.load_characters(str(tmp_path), cache)[0], expected)
    assert len(calls) == 40


def test_a_crash_while_writing_the_cache_leaves_none_behind(tmp_path, monkeypatch):
    _fake_archives(str(tmp_path), alphabets=1, characters=1)
    cache = str(tmp_path / "cache")
    savez = np.savez

    def crash(file, **arrays):
        savez(file, **arrays)
        if hasattr(file, "truncate"):
            file.truncate(100)
        else:
            with open(file if str(file).endswith(".npz") else f"{file}.npz", "r+b") as f:
                f.truncate(100)
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(KeyboardInterrupt):
        omniglot.load_characters(str(tmp_path), cache)
    assert os.listdir(cache) == []      # neither a partial cache nor a temporary file
    monkeypatch.setattr(np, "savez", savez)
    images, _ = omniglot.load_characters(str(tmp_path), cache)
    np.testing.assert_array_equal(images, omniglot.load_characters(str(tmp_path))[0])
    [name] = os.listdir(cache)
    # A kill -9 skips the cleanup: what such a writer left an hour ago is removed by the next
    # write; a recent one may be another writer's, in progress, and is left to it.
    killed, busy = (os.path.join(cache, f".{name}.{tag}.tmp") for tag in ("dead", "busy"))
    for leftover in (killed, busy):
        with open(leftover, "wb") as f:
            f.write(b"partial")
    os.utime(killed, (time.time() - 7200,) * 2)
    os.remove(os.path.join(cache, name))
    omniglot.load_characters(str(tmp_path), cache)
    assert sorted(os.listdir(cache)) == sorted([f".{name}.busy.tmp", name])
    # A rerun soon after the kill wrote the cache while the leftover was recent; the runs
    # that only read it remove it once it is an hour old.
    os.utime(busy, (time.time() - 7200,) * 2)
    omniglot.load_characters(str(tmp_path), cache)
    assert os.listdir(cache) == [name]


def test_bad_data_gives_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; expected a directory holding"):
        omniglot.load_characters(str(tmp_path / "missing"))
    # The archive itself given as data_dir: it exists (it "did not").
    (tmp_path / "images_background.zip").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"images_background.zip' is a file, not a "
                                                r"directory \(give the directory that holds it\)"):
        omniglot.load_characters(str(tmp_path / "images_background.zip"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="images_background.zip nor the folder"):
        omniglot.load_characters(str(tmp_path / "empty"))
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for archive in omniglot.ARCHIVES:
        (corrupt / f"{archive}.zip").write_bytes(b"not a zip at all")
    with pytest.raises(ValueError, match="images_background.zip is not a valid zip"):
        omniglot.load_characters(str(corrupt))
    layout = tmp_path / "layout"
    layout.mkdir()
    _fake_archives(str(layout), bad_name="images_background/stray.png")
    with pytest.raises(ValueError, match="unexpected entry 'images_background/stray.png'"):
        omniglot.load_characters(str(layout))
    short = tmp_path / "short"
    short.mkdir()
    _fake_archives(str(short), drawings=19)
    with pytest.raises(ValueError, match="has 19 drawings, expected 20"):
        omniglot.load_characters(str(short))


def _toy_tasks(n_way=3, rotate=False, classes=6):
    # Every image is constant: its value encodes (class, drawing).
    values = np.arange(classes * 20, dtype=np.uint8).reshape(classes, 20)
    images = np.broadcast_to(values[:, :, None, None, None], (classes, 20, 4, 4, 1)).copy()
    return ImageClassTasks({"train": images, "test": images[:n_way]}, n_way, k_shot=2,
                           k_query=3, rotate_train=rotate), values


def test_episodes_are_well_formed_and_reproducible():
    tasks, _ = _toy_tasks()
    episode = tasks.sample(tf.constant([5, 6], tf.int64), 50)
    sx, sy, qx, qy = (t.numpy() for t in episode)
    assert sx.shape == (50, 6, 4, 4, 1) and qx.shape == (50, 9, 4, 4, 1)
    code = lambda x: np.rint(x[..., 0, 0, 0] * 255).astype(int)  # noqa: E731
    for t in range(50):
        support_class = code(sx[t]) // 20
        query_class = code(qx[t]) // 20
        # One class per label, N distinct classes, query drawings differ from support's.
        for label in range(3):
            assert len(set(support_class[sy[t] == label])) == 1
            assert set(query_class[qy[t] == label]) == set(support_class[sy[t] == label])
        assert len(set(support_class)) == 3
        assert not set(code(sx[t])) & set(code(qx[t]))
    again = tasks.sample(tf.constant([5, 6], tf.int64), 50)
    np.testing.assert_array_equal(sx, again.support_x.numpy())
    # Different tasks do get different classes.
    assert len({tuple(sorted(set(code(sx[t]) // 20))) for t in range(50)}) > 5


def test_rotations_make_new_training_classes():
    tasks, _ = _toy_tasks(rotate=True)
    assert tasks.num_classes == {"train": 24, "test": 3}
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (5, 20, 4, 4, 1), dtype=np.uint8)
    rotated = ImageClassTasks({"train": images, "test": images}, 5, 1, 1, rotate_train=True)
    episode = rotated.sample(tf.constant([1, 2], tf.int64), 200)
    seen = np.rint(episode.support_x.numpy() * 255).astype(np.uint8).reshape(-1, 4, 4, 1)
    originals = images.reshape(-1, 4, 4, 1)
    rotations = {k for image in seen for k in range(4)
                 if any(np.array_equal(np.rot90(o, k), image) for o in originals)}
    assert rotations == {0, 1, 2, 3}


def test_a_rotated_class_is_rotated_alike_in_support_and_query():
    """Rotation is a property of the class (per task and label), never of the single image."""
    classes, drawings, size = 6, 20, 5
    # One bright pixel in the top-left corner (asymmetric: each rotation moves it to another
    # corner); its value names (class, drawing), so every image is recognisable after rotating.
    images = np.zeros((classes, drawings, size, size, 1), np.uint8)
    images[:, :, 0, 0, 0] = 1 + np.arange(classes * drawings).reshape(classes, drawings)
    tasks = ImageClassTasks({"train": images, "test": images}, 5, k_shot=3, k_query=4,
                            rotate_train=True)
    corners = {(np.argwhere(np.rot90(images[0, 0], k))[0][0],
                np.argwhere(np.rot90(images[0, 0], k))[0][1]): k for k in range(4)}

    def identify(x):
        """(class, drawing, rotation) of each image of x [n, H, W, 1] in [0, 1]."""
        pixels = np.rint(x[..., 0] * 255).astype(int)
        out = []
        for image in pixels:
            (row, col), = np.argwhere(image)
            code = image[row, col] - 1
            out.append((code // drawings, code % drawings, corners[(row, col)]))
        return out

    episode = tasks.sample(tf.constant([3, 4], tf.int64), 40)
    sx, sy, qx, qy = (t.numpy() for t in episode)
    rotations_per_task, seen = [], set()
    for t in range(40):
        support, query = identify(sx[t]), identify(qx[t])
        identities = set()
        for label in range(5):
            members = ([s for s, y in zip(support, sy[t]) if y == label]
                       + [q for q, y in zip(query, qy[t]) if y == label])
            assert len(members) == 3 + 4
            # One character, one rotation for every support and query image of the label.
            identity = {(c, k) for c, _, k in members}
            assert len(identity) == 1, f"task {t} label {label} mixes {sorted(identity)}"
            # Distinct drawings of it.
            assert len({d for _, d, _ in members}) == 7
            identities |= identity
        assert len(identities) == 5   # labels are distinct (character, rotation) classes
        rotations_per_task.append({k for _, k in identities})
        seen |= identities
    # Every rotation of every character occurs, and tasks mix rotations across labels.
    assert seen == {(c, k) for c in range(classes) for k in range(4)}
    assert any(len(r) > 1 for r in rotations_per_task)


def test_too_few_classes_or_examples_is_refused():
    images = np.zeros((4, 20, 4, 4, 1), np.uint8)
    with pytest.raises(ValueError, match="test split has 4 classes, fewer than n_way=5"):
        ImageClassTasks({"train": np.zeros((9, 20, 4, 4, 1), np.uint8), "test": images}, 5, 1, 1)
    with pytest.raises(ValueError, match="fewer than k_shot \\+ k_query = 21"):
        ImageClassTasks({"train": images, "test": images}, 2, 10, 11)
