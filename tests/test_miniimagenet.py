"""MiniImagenet loader on small generated images in Ravi & Larochelle's layout."""

import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tf_maml import config as config_lib
from tf_maml import trainer
from tf_maml.tasks import miniimagenet

CLASSES = {"train": 6, "val": 5, "test": 5}


def _write_dataset(root, per_class=20, size=(40, 30)):
    """images/ + train.csv, val.csv, test.csv; each class a distinct colour."""
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    rng = np.random.default_rng(0)
    for split, count in CLASSES.items():
        lines = ["filename,label"]
        for c in range(count):
            label = f"n{split}{c:03d}"
            colour = rng.integers(0, 255, 3)
            for i in range(per_class):
                name = f"{label}{i:08d}.jpg"
                pixels = np.clip(colour + rng.integers(-10, 10, (size[1], size[0], 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(os.path.join(root, "images", name))
                lines.append(f"{name},{label}")
        with open(os.path.join(root, f"{split}.csv"), "w") as f:
            f.write("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def mini_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("miniimagenet"))
    _write_dataset(root)
    return root


def test_loads_splits_at_84x84_and_samples_episodes(mini_dir, tmp_path):
    tasks = miniimagenet.miniimagenet_tasks(5, 1, 15, mini_dir, cache_dir=str(tmp_path))
    assert tasks.num_classes == {"train": 6, "val": 5, "test": 5}
    assert tasks.input_shape == (84, 84, 3)
    episode = tasks.sample(tf.constant([0, 1], tf.int64), 4, split="val")
    assert episode.support_x.shape == (4, 5, 84, 84, 3)
    assert episode.query_x.shape == (4, 75, 84, 84, 3)
    # Each label is one class (one colour) across support and query.
    sx, sy = episode.support_x.numpy(), episode.support_y.numpy()
    qx, qy = episode.query_x.numpy(), episode.query_y.numpy()
    for label in range(5):
        colour = sx[0][sy[0] == label].mean(axis=(0, 1, 2))
        np.testing.assert_allclose(qx[0][qy[0] == label].mean(axis=(0, 1, 2)), colour, atol=0.02)
    # Cached splits load identically.
    again = miniimagenet.load_split(mini_dir, "train", str(tmp_path))
    np.testing.assert_array_equal(again, miniimagenet.load_split(mini_dir, "train"))


def test_trains_with_the_maxpool_conv4(mini_dir, tmp_path):
    config = config_lib.Config(dataset="miniimagenet", data_dir=mini_dir, cache_dir="", n_way=5,
                               k_shot=1, k_query=2, meta_batch_size=2, num_inner_steps=2,
                               inner_lr=0.01, num_iterations=3, validate_every=0,
                               num_eval_tasks=4)
    experiment, step = trainer.train(config, str(tmp_path))
    assert step == 3 and experiment.model.name == "conv4"
    assert experiment.forward.vectorized
    assert any("max_pooling2d" in layer.name for layer in experiment.model.layers)
    # It trained: the weights moved from the same seed's initialization, and stayed finite.
    from tf_maml import experiment as experiment_lib
    initial = experiment_lib.build_experiment(config, load_tasks=False,
                                              spec=experiment.spec).algorithm.meta_variables
    trained = experiment.algorithm.meta_variables
    assert all(np.all(np.isfinite(v.numpy())) for v in trained)
    # Adam's first steps move a weight by about meta_lr each: 3 steps move the most-moved
    # weights by 1-3 meta_lr (and an initialization other than the run's would differ by far more).
    moved = max(float(np.abs(a.numpy() - b.numpy()).max()) for a, b in zip(trained, initial))
    assert 0.5 * config.meta_lr < moved < 4 * config.meta_lr, moved


def test_bad_layouts_give_clear_errors(mini_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="train.csv does not exist"):
        miniimagenet.miniimagenet_tasks(5, 1, 1, str(tmp_path))
    (tmp_path / "train.csv").write_text("image,class\nx.jpg,a\n")
    with pytest.raises(ValueError, match="expected a CSV with header 'filename,label'"):
        miniimagenet.load_split(str(tmp_path), "train")
    (tmp_path / "train.csv").write_text("filename,label\nmissing.jpg,a\n")
    with pytest.raises(FileNotFoundError, match="missing.jpg: listed in the split CSV but missing"):
        miniimagenet.load_split(str(tmp_path), "train")
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "broken.jpg").write_bytes(b"nope")
    (tmp_path / "train.csv").write_text("filename,label\nbroken.jpg,a\n")
    with pytest.raises(ValueError, match="broken.jpg: not a readable image"):
        miniimagenet.load_split(str(tmp_path), "train")
    with pytest.raises(ValueError, match="train split has 6 classes, fewer than n_way=8"):
        miniimagenet.miniimagenet_tasks(8, 1, 1, mini_dir)
    with pytest.raises(ValueError, match="needs data_dir"):
        config_lib.Config(dataset="miniimagenet").validate()


def test_excel_csvs_uneven_classes_and_overlapping_splits(mini_dir, tmp_path, monkeypatch):
    import shutil
    root = tmp_path / "mini"
    shutil.copytree(mini_dir, root)
    # A byte-order mark (Excel's "CSV UTF-8") is read as the header it precedes.
    text = (root / "val.csv").read_text()
    (root / "val.csv").write_text("\ufeff" + text, encoding="utf-8")
    assert miniimagenet.load_split(str(root), "val").shape[:2] == (5, 20)
    # Uneven classes keep as many images as the smallest, and say so.
    warnings = []
    monkeypatch.setattr(miniimagenet.logging, "warning",
                        lambda message, *args: warnings.append(message % args))
    lines = (root / "test.csv").read_text().splitlines()
    (root / "test.csv").write_text("\n".join(lines[:-15]) + "\n")  # n_test004 keeps 5 images
    assert miniimagenet.load_split(str(root), "test").shape[:2] == (5, 5)
    assert warnings == ["MiniImagenet test: every class keeps 5 images, as many as its smallest "
                        "(ntest004); 60 listed images are not used"]
    # Blank lines (a trailing one, Windows line ends) are skipped.
    (root / "test.csv").write_text("\r\n".join(lines) + "\r\n\r\n \r\n")
    assert miniimagenet.load_split(str(root), "test").shape[:2] == (5, 20)
    # A class in two splits would leak meta-test classes into meta-training.
    (root / "test.csv").write_text("\n".join(lines + ["ntrain00000000000.jpg,ntrain000"]) + "\n")
    with pytest.raises(ValueError, match="1 class\\(es\\) are in both train and test "
                                         "\\(ntrain000\\); the splits must be disjoint"):
        miniimagenet.miniimagenet_tasks(5, 1, 1, str(root))
    # So would one image under another label, in another split.
    (root / "test.csv").write_text("\n".join(lines + ["ntrain00000000000.jpg,ntest004"]) + "\n")
    with pytest.raises(ValueError, match=r"1 image\(s\) are listed in both train.csv and "
                                         r"test.csv \(ntrain00000000000.jpg\)"):
        miniimagenet.miniimagenet_tasks(5, 1, 1, str(root))
    # An image listed twice would be its own support and query example.
    (root / "test.csv").write_text("\n".join(lines + [lines[-1]]) + "\n")
    with pytest.raises(ValueError, match=r"test.csv:\d+: ntest00400000019.jpg is listed again "
                                         r"\(first on line \d+\)"):
        miniimagenet.load_split(str(root), "test")
    (root / "train.csv").write_text("image,class\nx.jpg,a\n")
    with pytest.raises(ValueError, match="found 'image,class'"):
        miniimagenet.load_split(str(root), "train")


def _counting_decoder(monkeypatch):
    calls = []
    decode = miniimagenet._decode

    def counted(path):
        calls.append(path)
        return decode(path)

    monkeypatch.setattr(miniimagenet, "_decode", counted)
    return calls


def test_cache_is_read_and_follows_a_changed_image(tmp_path, monkeypatch):
    root, cache = str(tmp_path / "data"), str(tmp_path / "cache")
    _write_dataset(root, per_class=2)
    calls = _counting_decoder(monkeypatch)
    first = miniimagenet.load_split(root, "train", cache)
    assert len(calls) == 12 and len(os.listdir(cache)) == 1
    # A second load reads the cache: nothing is decoded.
    np.testing.assert_array_equal(miniimagenet.load_split(root, "train", cache), first)
    assert len(calls) == 12
    # The CSV is unchanged, but one of its images is replaced (same name): decoded again.
    image = os.path.join(root, "images", "ntrain00300000001.jpg")
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(image)
    changed = miniimagenet.load_split(root, "train", cache)
    assert len(calls) == 24
    assert changed[3, 1].max() < 10 and first[3, 1].max() > 10
    np.testing.assert_array_equal(np.delete(changed.reshape(12, -1), 7, axis=0),
                                  np.delete(first.reshape(12, -1), 7, axis=0))
    # A missing image is named, whether the split is cached or not.
    os.remove(image)
    with pytest.raises(FileNotFoundError, match="ntrain00300000001.jpg: listed in the split"):
        miniimagenet.load_split(root, "train", cache)


def test_truncated_or_interrupted_cache_is_never_read(tmp_path, monkeypatch):
    root, cache = str(tmp_path / "data"), str(tmp_path / "cache")
    _write_dataset(root, per_class=2)
    savez = np.savez

    def crash(file, **arrays):
        savez(file, **arrays)
        file.truncate(100)
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(KeyboardInterrupt):
        miniimagenet.load_split(root, "val", cache)
    assert os.listdir(cache) == []      # neither a partial cache nor a temporary file
    monkeypatch.setattr(np, "savez", savez)
    expected = miniimagenet.load_split(root, "val", cache)
    (name,) = os.listdir(cache)
    path = os.path.join(cache, name)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    calls = _counting_decoder(monkeypatch)
    np.testing.assert_array_equal(miniimagenet.load_split(root, "val", cache), expected)
    assert len(calls) == 10 and os.listdir(cache) == [name]
    np.testing.assert_array_equal(miniimagenet.load_split(root, "val", cache), expected)
    assert len(calls) == 10
