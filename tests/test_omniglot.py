"""Omniglot: the real archives, the folder layout, TFDS, episodes, bad data, and learning.

Tests on the real archives read their directory from TF_MAML_OMNIGLOT_DIR (.ci/run sets it);
they are skipped when it is unset and fail when it is set but the files are missing.
"""

import io
import os
import zipfile

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tf_maml import config as config_lib
from tf_maml import reporting, trainer
from tf_maml.tasks import ImageClassTasks, omniglot

ENV = "TF_MAML_OMNIGLOT_DIR"


@pytest.fixture(scope="module")
def omniglot_dir():
    path = os.environ.get(ENV)
    if not path:
        pytest.skip(f"{ENV} is not set")
    for name in ("images_background.zip", "images_evaluation.zip"):
        if not os.path.isfile(os.path.join(path, name)):
            pytest.fail(f"{ENV}={path} but {name} is missing there")
    return path


@pytest.fixture(scope="module")
def real_characters(omniglot_dir, tmp_path_factory):
    return omniglot.load_characters(omniglot_dir, str(tmp_path_factory.mktemp("cache")))


def test_real_archives_decode_to_the_paper_format(real_characters):
    images, background = real_characters
    assert images.shape == (1623, 20, 28, 28, 1) and images.dtype == np.uint8
    assert background.sum() == 964
    # Inverted: ink is bright, the page dark; every drawing has some ink.
    assert images.mean() < 40
    assert (images.reshape(1623 * 20, -1).max(axis=1) > 128).all()


def test_paper_and_lake_splits(real_characters):
    _, background = real_characters
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


def test_meta_training_learns_real_omniglot(omniglot_dir, tmp_path):
    """A few hundred iterations of 5-way 1-shot reach accuracy far above chance (20%)."""
    config = config_lib.Config(
        dataset="omniglot", data_dir=omniglot_dir, cache_dir=str(tmp_path / "cache"), n_way=5,
        k_shot=1, k_query=5, meta_batch_size=32, num_inner_steps=1, inner_lr=0.4,
        meta_lr=0.003, num_iterations=300, log_every=100, checkpoint_every=1000,
        validate_every=0, num_eval_tasks=200, num_eval_steps=3)
    trainer.train(config, str(tmp_path / "run"))
    results = reporting.evaluate_and_report(str(tmp_path / "run"))
    mean, ci = results["MAML"]
    print("5-way 1-shot accuracy after 0..3 steps:", mean, "±", ci)
    assert mean[0] < 0.3                      # before adaptation: chance
    assert mean[-1] - ci[-1] >= 0.80          # held-out characters, after 3 steps


def _png(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _fake_archives(root, alphabets=2, characters=3, drawings=20, as_zip=True, bad_name=None):
    """Writes a tiny Omniglot in Lake's layout: black strokes on white, 105x105."""
    rng = np.random.default_rng(0)
    for archive in omniglot.ARCHIVES:
        files = {}
        for a in range(alphabets):
            for c in range(characters):
                for d in range(drawings):
                    image = np.full((105, 105), 255, np.uint8)
                    image[rng.integers(0, 90):, rng.integers(0, 90)] = 0
                    name = f"{archive}/Alpha{a}/character{c + 1:02d}/{c:04d}_{d + 1:02d}.png"
                    files[name] = _png(image)
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


def test_tfds_source_without_network(tmp_path):
    import tensorflow_datasets as tfds

    def as_dataset(self, split, **kwargs):
        labels = range(4) if split == "train" else range(4, 6)
        images = np.full((len(labels) * 20, 105, 105, 3), 255, np.uint8)
        images[:, 30:75, 45:60] = 0
        return tf.data.Dataset.from_tensor_slices({
            "image": images, "label": np.repeat(list(labels), 20).astype(np.int64)})

    with tfds.testing.mock_data(as_dataset_fn=as_dataset):
        images, background = omniglot.load_characters(None)
    assert images.shape == (6, 20, 28, 28, 1) and background.tolist() == [True] * 4 + [False] * 2
    assert images[:, :, 14, 14].min() > 200 and images[:, :, 2, 2].max() == 0


def test_bad_data_gives_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; expected a directory holding"):
        omniglot.load_characters(str(tmp_path / "missing"))
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


def test_too_few_classes_or_examples_is_refused():
    images = np.zeros((4, 20, 4, 4, 1), np.uint8)
    with pytest.raises(ValueError, match="test split has 4 classes, fewer than n_way=5"):
        ImageClassTasks({"train": np.zeros((9, 20, 4, 4, 1), np.uint8), "test": images}, 5, 1, 1)
    with pytest.raises(ValueError, match="fewer than k_shot \\+ k_query = 21"):
        ImageClassTasks({"train": images, "test": images}, 2, 10, 11)
