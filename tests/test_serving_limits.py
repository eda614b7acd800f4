"""Graph loops, serving limits, task-major and image signatures, and safe export writes.

Fast tests on the in-process signatures (no SavedModel written, except by fakes);
tests/test_export.py checks the same signatures loaded from disk and on the wire.
"""

import ctypes
import io
import os
import sys
import threading
import time

import numpy as np
import pytest
import tensorflow as tf

from tf_maml import config as config_lib
from tf_maml import core, evaluation, serving
from tf_maml import experiment as experiment_lib
from tf_maml.tasks import ImageClassTasks

TOLERANCE = dict(rtol=1e-5, atol=1e-5)
# One task alone against the same task among others in one graph (models without grouped
# convolutions): the same arithmetic, possibly summed in another order over the tasks, which
# the inner steps amplify. A conv model's tasks run one at a time: TOLERANCE.
TASKS_TOLERANCE = dict(rtol=1e-4, atol=1e-4)


def _classifier(algorithm="maml", **extra):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (8, 6, 12, 12, 1), dtype=np.uint8)
    tasks = ImageClassTasks({"train": images, "test": images}, n_way=3, k_shot=2, k_query=2)
    config = config_lib.Config(dataset="omniglot", n_way=3, k_shot=2, k_query=2, inner_lr=0.4,
                               num_eval_steps=3, algorithm=algorithm, **extra)
    experiment = experiment_lib.build_experiment(config, tasks)
    # Learned meta-parameters that differ from their initial values and per element.
    for variable in experiment.algorithm.extra_variables:
        variable.assign(variable * rng.uniform(0.5, 1.5, size=variable.shape))
    return experiment


def _sine(algorithm="maml", **extra):
    return experiment_lib.build_experiment(
        config_lib.Config(algorithm=algorithm, k_shot=5, k_query=5, **extra))


EXPERIMENTS = {
    "sine_maml": lambda: _sine(),
    "sine_reptile_adam": lambda: _sine("reptile", inner_optimizer="adam", inner_lr=0.01),
    "classifier_mamlpp": lambda: _classifier("mamlpp", num_inner_steps=3),
    "classifier_maml": lambda: _classifier(),
}
_BUILT = {}


def _experiment(name):
    if name not in _BUILT:
        _BUILT[name] = EXPERIMENTS[name]()
    return _BUILT[name]


def _episode(experiment, num_tasks=3, seed=0):
    return experiment.tasks.sample(tf.constant([seed, 7], tf.int64), num_tasks, "test")


def _unrolled_curve(algorithm, params, episode, metric_fn, num_steps, inner_lr=None,
                    transductive=True):
    """The reference: the steps unrolled in Python, one after another (the old implementation)."""
    num_tasks = tf.shape(episode.support_x)[0]
    support = algorithm.task_inputs(params, episode.support_x)
    query = algorithm.task_inputs(params, episode.query_x) if transductive else None
    weights = algorithm.initial_weights(params, num_tasks)
    update = algorithm.inner_update(params, inner_lr)
    task_loss = algorithm.task_loss(params, support, episode.support_y)
    state = update.init(weights)
    metrics, predictions = [], []
    for step in range(num_steps + 1):
        if step > 0:
            weights, state, _ = core.inner_step(task_loss, weights, update, state, step - 1,
                                                first_order=True)
        if transductive:
            prediction = algorithm.predict_from_inputs(params, weights, query, step)
        else:
            prediction = evaluation._predict_each_alone(algorithm, params, weights,
                                                        episode.support_x, episode.query_x, step)
        predictions.append(prediction)
        metrics.append(metric_fn(episode.query_y, prediction))
    return tf.stack(metrics), predictions


def _graph_size(concrete):
    """Nodes of a traced function and of every function it calls (while bodies included)."""
    graph_def = concrete.graph.as_graph_def()
    return len(graph_def.node) + sum(len(f.node_def) for f in graph_def.library.function)


# -- C1: graph loops ---------------------------------------------------------------------------


@pytest.mark.parametrize("name,transductive,inner_lr,eager", [
    ("sine_maml", True, None, True),
    ("sine_reptile_adam", True, None, False),     # Adam's state through the loop
    ("classifier_mamlpp", True, None, False),     # per-step rates and batch norm, steps > rows
    ("classifier_maml", False, 0.2, False),       # non-transductive, a replaced rate
])
def test_adaptation_curve_loop_equals_unrolled_steps(name, transductive, inner_lr, eager):
    experiment = _experiment(name)
    algorithm, params = experiment.algorithm, experiment.algorithm.meta_variables
    episode = _episode(experiment, num_tasks=2)
    steps = 4
    if eager:  # as reporting calls it
        metrics, predictions = evaluation.adaptation_curve(algorithm, params, episode,
                                                           experiment.metric_fn, steps,
                                                           inner_lr, transductive)
        expected_metrics, expected = _unrolled_curve(algorithm, params, episode,
                                                     experiment.metric_fn, steps, inner_lr,
                                                     transductive)
        assert metrics.shape == (steps + 1, 2) and len(predictions) == steps + 1
        np.testing.assert_array_equal(metrics.numpy(), expected_metrics.numpy())
        for got, want in zip(predictions, expected):
            np.testing.assert_array_equal(got.numpy(), want.numpy())
    # Compiled (evaluate, validation): the graph loop against the unrolled graph.
    curve = evaluation.make_curve_fn(algorithm, experiment.metric_fn, steps, inner_lr,
                                     transductive)
    unrolled = tf.function(lambda p, e: _unrolled_curve(algorithm, p, e, experiment.metric_fn,
                                                        steps, inner_lr, transductive)[0])
    got, want = curve(params, episode).numpy(), unrolled(params, episode).numpy()
    assert got.shape == (steps + 1, 2)
    np.testing.assert_array_equal(got, want)


def test_curve_graph_does_not_grow_with_steps():
    experiment = _experiment("sine_maml")
    params = [tf.convert_to_tensor(p) for p in experiment.algorithm.meta_variables]
    episode = _episode(experiment)
    sizes = {}
    for steps in (3, 300):
        curve = evaluation.make_curve_fn(experiment.algorithm, experiment.metric_fn, steps)
        start = time.perf_counter()
        sizes[steps] = _graph_size(curve.get_concrete_function(params, episode))
        metrics = curve(params, episode)
        elapsed = time.perf_counter() - start
        assert metrics.shape == (steps + 1, 3)
    assert sizes[3] == sizes[300], sizes
    # Unrolled, 300 steps took minutes to build; the loop builds and runs in about a second.
    assert elapsed < 30, elapsed
    # With XLA (training's validation and evaluate use it for dense models) too.
    compiled = evaluation.make_curve_fn(experiment.algorithm, experiment.metric_fn, 300,
                                        jit_compile=True)
    np.testing.assert_allclose(compiled(params, episode).numpy(), metrics.numpy(),
                               rtol=1e-4, atol=1e-5)


def test_export_signature_graphs_do_not_grow_with_steps():
    experiment = _experiment("classifier_mamlpp")
    limits = serving.ServingLimits(10, 10, 300, 4)
    specs = {"adapt": [tf.TensorSpec(None, tf.float32), tf.TensorSpec(None, tf.int32),
                       tf.TensorSpec(None, tf.float32)],
             "adapted_weights": [tf.TensorSpec(None, tf.float32), tf.TensorSpec(None, tf.int32)]}
    sizes = {}
    for steps in (3, 300):
        signatures = serving.AdaptationSignatures(experiment.algorithm, experiment.spec, steps,
                                                  None, limits)
        for name, spec in specs.items():
            function = tf.function(getattr(signatures, name), input_signature=spec,
                                   autograph=False)
            sizes[steps, name] = _graph_size(function.get_concrete_function())
    for name in specs:
        assert sizes[3, name] == sizes[300, name], sizes


# -- D2: task-major signatures ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sine_maml", "sine_reptile_adam", "classifier_mamlpp"])
def test_task_major_signatures_answer_each_task_as_alone(name):
    experiment = _experiment(name)
    signatures = serving.AdaptationSignatures(experiment.algorithm, experiment.spec, 3)
    tolerance = TASKS_TOLERANCE
    if name.startswith("classifier") and experiment.algorithm.forward.vectorized:
        assert signatures.one_task_at_a_time  # grouped convolutions: each task alone
        tolerance = TOLERANCE
    episode = _episode(experiment, seed=2)
    tasks = {"support_x": episode.support_x, "support_y": episode.support_y,
             "query_x": episode.query_x}
    lr = experiment.config.inner_lr
    steps, rates = [2, 0, 3], [lr, 0.5 * lr, 2 * lr]
    together = signatures.adapt_tasks(**tasks)
    custom = signatures.adapt_tasks_custom(**tasks, inner_steps=tf.constant(steps),
                                           inner_lr=tf.constant(rates))
    for i in range(3):
        task = {k: v[i] for k, v in tasks.items()}
        alone = signatures.adapt(**task)
        alone_custom = signatures.adapt_custom(**task, inner_steps=tf.constant(steps[i]),
                                               inner_lr=tf.constant(rates[i]))
        assert set(together) == set(alone) == set(custom)
        for key in together:
            np.testing.assert_allclose(together[key][i].numpy(), alone[key].numpy(),
                                       **tolerance)
            np.testing.assert_allclose(custom[key][i].numpy(), alone_custom[key].numpy(),
                                       **tolerance)
    # The tasks really differ in what they were asked for.
    assert not np.allclose(custom["predictions"][0], together["predictions"][0])


# -- C2: limits ---------------------------------------------------------------------------------


def test_limits_defaults_and_validation():
    assert serving.default_limits("sine") == serving.DEFAULT_LIMITS["sine"]
    assert serving.default_limits(_experiment("sine_maml").spec) == serving.DEFAULT_LIMITS["sine"]
    assert (serving.default_limits(_experiment("classifier_maml").spec)
            == serving.DEFAULT_LIMITS["omniglot"])
    for limits in serving.DEFAULT_LIMITS.values():
        assert limits.validate() is limits
    with pytest.raises(ValueError, match="max_tasks must be a positive integer"):
        serving.ServingLimits(1, 1, 1, 0).validate()
    experiment = _experiment("sine_maml")
    with pytest.raises(ValueError, match="num_eval_steps \\(20\\) exceeds max_inner_steps "
                                         "\\(10\\)"):
        serving.AdaptationSignatures(experiment.algorithm, experiment.spec, 20, None,
                                     serving.ServingLimits(10, 10, 10, 1))


# -- D3: encoded images -------------------------------------------------------------------------


def _drawing(rng, size, mode="L"):
    """A page with dark strokes, as Omniglot's PNGs (ink black on white), PNG-encoded."""
    from PIL import Image, ImageDraw
    image = Image.new(mode, (size, size), "white")
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        points = [tuple(int(v) for v in rng.integers(0, size, 2)) for _ in range(3)]
        draw.line(points, fill="black" if mode == "L" else (20, 40, 90), width=size // 12)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def omniglot_signatures():
    config = config_lib.Config(dataset="omniglot", n_way=3, inner_lr=0.4)
    experiment = experiment_lib.build_experiment(config, load_tasks=False)  # 28x28x1, no data
    return serving.AdaptationSignatures(experiment.algorithm, experiment.spec, 2, 0.4, None,
                                        serving.image_format_for("omniglot"))


def test_image_signatures_resize_as_a_nearest_run_trained():
    """A run trained on nearest-resized images (Reptile's loader) is served the same pixels."""
    from PIL import Image

    from tf_maml.tasks import omniglot
    config = config_lib.Config(dataset="omniglot", n_way=3, omniglot_resize_filter="nearest")
    experiment = experiment_lib.build_experiment(config, load_tasks=False)
    image_format = serving.image_format_for("omniglot", None, "nearest")
    signatures = serving.AdaptationSignatures(experiment.algorithm, experiment.spec, 2, 0.4, None,
                                              image_format)
    rng = np.random.default_rng(1)
    pages = []
    for _ in range(4):  # 1-bit PNGs, as Lake's
        with Image.open(io.BytesIO(_drawing(rng, 105))) as page:
            out = io.BytesIO()
            page.convert("1").save(out, format="PNG")
            pages.append(out.getvalue())
    decoded = signatures.decode_images(tf.constant(pages))["x"].numpy()
    training = np.stack([omniglot._decode(page, "page", "nearest") for page in pages])
    np.testing.assert_array_equal(decoded, training[..., None] / np.float32(255))


def test_image_signatures_preprocess_as_training(omniglot_signatures):
    from tf_maml.tasks import omniglot
    rng = np.random.default_rng(0)
    pages = [_drawing(rng, 105) for _ in range(6)] + [_drawing(rng, 105, "RGB")]
    decoded = omniglot_signatures.decode_images(tf.constant(pages))["x"].numpy()
    training = np.stack([omniglot._decode(page, "page") for page in pages])[..., None] / 255.0
    assert decoded.shape == (7, 28, 28, 1) and decoded.dtype == np.float32
    # Ink is 1 on a 0 background, as in training; TF's Lanczos resize against PIL's.
    assert decoded.max() > 0.5 and np.median(decoded) == 0.0
    assert np.abs(decoded - training).max() < 0.25, np.abs(decoded - training).max()
    assert np.abs(decoded - training).mean() < 0.01, np.abs(decoded - training).mean()
    # At the model's size nothing is resampled: exactly the training arrays.
    small = [_drawing(rng, 28) for _ in range(3)]
    np.testing.assert_array_equal(
        omniglot_signatures.decode_images(tf.constant(small))["x"].numpy(),
        np.stack([omniglot._decode(page, "page") for page in small])[..., None] / np.float32(255))

    labels = tf.constant([0, 1, 2, 0, 1, 2], tf.int32)
    got = omniglot_signatures.adapt_images(tf.constant(pages[:6]), labels, tf.constant(pages[4:]))
    want = omniglot_signatures.adapt(decoded[:6], labels, decoded[4:])
    for key in ("predictions", "probabilities"):
        np.testing.assert_allclose(got[key].numpy(), want[key].numpy(), **TOLERANCE)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="images: an image is not a PNG, JPEG, GIF or BMP image"):
        omniglot_signatures.decode_images(tf.constant([b"not an image"]))


def _jpeg(pixels, mode=None):
    from PIL import Image
    image = Image.fromarray(pixels)
    out = io.BytesIO()
    (image.convert(mode) if mode else image).save(out, format="JPEG", quality=90)
    return out.getvalue()


def test_image_signatures_decode_jpegs_as_the_pil_loaders_do(omniglot_signatures):
    """Noisy JPEGs at the model's size: exactly PIL's pixels (the loaders' decoder), gray
    and RGB; a CMYK JPEG, which libjpeg cannot turn gray, is read too. TFDS' exports keep
    TensorFlow's own decoder, which training used there."""
    from PIL import Image

    def pil(data, mode):
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert(mode), np.float32)

    rng = np.random.default_rng(5)
    # The gray conversion alone, on 64k random colors: PIL's integer luma exactly (TF's float
    # weights were one level off on 1.3% of all colors).
    colors = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    np.testing.assert_array_equal(serving._pil_gray(tf.constant(colors)).numpy()[..., 0],
                                  np.asarray(Image.fromarray(colors).convert("L"), np.float32))
    color = rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)
    files = [_jpeg(color), _jpeg(color[..., 0]), _jpeg(color, "CMYK")]
    gray = omniglot_signatures.decode_images(tf.constant(files))["x"].numpy()[..., 0]
    want = [(255 - pil(data, "L")) / np.float32(255) for data in files]  # Omniglot inverts
    np.testing.assert_array_equal(gray[:2], np.stack(want[:2]))
    assert np.abs(gray[2] - want[2]).max() <= 1.01 / 255  # CMYK: PIL's own conversion
    # RGB (MiniImagenet's format: 84x84x3, not inverted)
    config = config_lib.Config(dataset="miniimagenet", data_dir="/not/read", n_way=3,
                               inner_lr=0.4)
    experiment = experiment_lib.build_experiment(config, load_tasks=False)
    signatures = serving.AdaptationSignatures(experiment.algorithm, experiment.spec, 1, 0.4,
                                              None, serving.image_format_for("miniimagenet"))
    photo = rng.integers(0, 256, (84, 84, 3), dtype=np.uint8)
    np.testing.assert_array_equal(
        signatures.decode_images(tf.constant([_jpeg(photo)]))["x"].numpy()[0],
        pil(_jpeg(photo), "RGB") / np.float32(255))
    # TFDS' images went through TensorFlow's decode_image in training: served the same way.
    tfds_format = serving.image_format_for("tfds:some_dataset", (28, 28, 1))
    assert not tfds_format.pil_jpeg and serving.image_format_for("folder", (28, 28, 1)).pil_jpeg
    experiment = experiment_lib.build_experiment(
        config_lib.Config(dataset="omniglot", n_way=3, inner_lr=0.4), load_tasks=False)
    tfds_signatures = serving.AdaptationSignatures(experiment.algorithm, experiment.spec, 2, 0.4,
                                                   None, tfds_format)
    np.testing.assert_array_equal(
        tfds_signatures.decode_images(tf.constant(files[:1]))["x"].numpy()[0, ..., 0],
        tf.io.decode_image(files[0], channels=1).numpy()[..., 0] / np.float32(255))


def _transparent_drawings(size=28):
    """The same strokes as PNGs with transparency of each kind, and opaque on white."""
    from PIL import Image, ImageDraw

    def drawing(mode, background, ink):
        image = Image.new(mode, (size, size), background)
        ImageDraw.Draw(image).line([(3, 3), (size - 4, size - 8), (5, size - 3)], fill=ink,
                                   width=3)
        return image

    palette = drawing("P", 0, 1)
    palette.putpalette([0, 0, 0] * 256)  # black background, made transparent by tRNS
    pngs = {"RGBA": (drawing("RGBA", (0, 0, 0, 0), (0, 0, 0, 255)), {}),
            "LA": (drawing("LA", (0, 0), (0, 255)), {}),
            "RGBA half ink": (drawing("RGBA", (0, 0, 0, 0), (10, 200, 30, 128)), {}),
            "P tRNS": (palette, {"transparency": 0}),
            "L tRNS": (drawing("L", 0, 50), {"transparency": 0}),
            "16-bit tRNS": (Image.fromarray(np.asarray(drawing("L", 0, 50), np.uint16) * 257),
                            {"transparency": 0}),
            # Transparent ink on opaque white: an all-white image.
            "1-bit tRNS": (drawing("L", 255, 0).convert("1"), {"transparency": 0})}
    encoded = {}
    for name, (image, options) in pngs.items():
        out = io.BytesIO()
        image.save(out, format="PNG", **options)
        encoded[name] = out.getvalue()
    # Bit depths: TensorFlow's alpha fill is 1 at 1 bit, so tRNS must be looked for there.
    assert encoded["1-bit tRNS"][24] == 1 and encoded["16-bit tRNS"][24] == 16
    out = io.BytesIO()
    drawing("L", 255, 0).save(out, format="PNG")
    return encoded, out.getvalue()


def test_image_signatures_show_transparent_pngs_over_white(omniglot_signatures):
    """Black strokes on transparent black pixels are strokes, not a black square."""
    from PIL import Image

    from tf_maml.tasks import omniglot, sources
    transparent, opaque = _transparent_drawings()
    decoded = omniglot_signatures.decode_images(tf.constant(list(transparent.values())))
    decoded = decoded["x"].numpy()[..., 0]
    on_white = omniglot_signatures.decode_images(tf.constant([opaque]))["x"].numpy()[0, ..., 0]
    assert 0.05 < on_white.mean() < 0.5  # Omniglot's convention: ink 1 on a 0 background
    names = list(transparent)
    for name in ("RGBA", "LA", "P tRNS"):  # opaque black ink
        np.testing.assert_array_equal(decoded[names.index(name)], on_white, err_msg=name)
    np.testing.assert_array_equal(decoded[names.index("1-bit tRNS")], 0)
    # Every kind as the folder loader composites it with PIL (partly transparent or gray
    # ink included): training and serving see the same pixels.
    for i, (name, data) in enumerate(transparent.items()):
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            want = 255 - np.asarray(sources._png_over_white(image, name).convert("L"),
                                    np.float32)
        np.testing.assert_allclose(decoded[i] * 255, want, atol=1e-3, err_msg=name)
        assert name == "1-bit tRNS" or 0 < decoded[i].mean() < 0.5, name
    # Opaque images keep the training decoder's exact pixels.
    np.testing.assert_array_equal(on_white * np.float32(255),
                                  omniglot._decode(opaque, "page").astype(np.float32))


def _exif_jpeg(pixels, orientation, byte_order="II"):
    """`pixels` as a JPEG whose EXIF says `orientation`, in either TIFF byte order."""
    import struct

    from PIL import Image
    form = "<" if byte_order == "II" else ">"
    exif = (b"Exif\0\0" + byte_order.encode() + struct.pack(form + "HI", 42, 8)
            + struct.pack(form + "H", 2)  # two entries: another tag, then the orientation
            + struct.pack(form + "HHI", 0x010F, 2, 4) + b"cam\0"  # Make, inline
            + struct.pack(form + "HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack(form + "I", 0))
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", exif=exif, quality=95)
    return out.getvalue()


def test_image_signatures_turn_jpegs_by_their_exif_orientation(omniglot_signatures):
    """A phone's photo is stored sideways with an EXIF orientation: served as it is shown."""
    from PIL import Image, ImageOps
    rng = np.random.default_rng(3)
    pixels = np.full((28, 28), 255, np.uint8)
    pixels[4:9, 3:20] = 0  # an asymmetric mark: every orientation gives other pixels
    pixels[9:24, 15:19] = 0
    pixels = np.clip(pixels.astype(int) + rng.integers(-3, 4, pixels.shape), 0, 255).astype(
        np.uint8)
    upright = {order: omniglot_signatures.decode_images(
        tf.constant([_exif_jpeg(pixels, 1, order)]))["x"].numpy()[0, ..., 0]
        for order in ("II", "MM")}
    # The same entropy-coded pixels (one encoder, one image): only the orientation differs.
    turned = {2: upright["II"][:, ::-1], 3: np.rot90(upright["II"], 2),
              4: upright["II"][::-1], 5: upright["II"].T, 6: np.rot90(upright["II"], -1),
              7: np.rot90(upright["II"].T, 2), 8: np.rot90(upright["II"], 1)}
    for order in ("II", "MM"):
        for orientation, want in turned.items():
            data = _exif_jpeg(pixels, orientation, order)
            got = omniglot_signatures.decode_images(tf.constant([data]))["x"].numpy()[0, ..., 0]
            np.testing.assert_array_equal(got, want, err_msg=f"{order} {orientation}")
            # PIL's exif_transpose (the folder loader's) turns the same way.
            with Image.open(io.BytesIO(data)) as image:
                copy = Image.fromarray(np.asarray(image.convert("L")))  # as the loader decodes
                copy.info["exif"] = image.info["exif"]
                np.testing.assert_array_equal(
                    got, (255 - np.asarray(ImageOps.exif_transpose(copy), np.float32)) / np.float32(255),
                    err_msg=f"{order} {orientation}")
        assert not np.array_equal(upright[order], turned[6])
    np.testing.assert_array_equal(upright["MM"], upright["II"])
    # No EXIF, an orientation outside 1-8, or metadata cut short: taken as upright.
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=95)
    plain = out.getvalue()
    for data in (plain, _exif_jpeg(pixels, 9), _exif_jpeg(pixels, 0)):
        np.testing.assert_array_equal(serving._jpeg_orientation(tf.constant(data)).numpy(), 1)
    damaged = _exif_jpeg(pixels, 6)
    for cut in (4, 12, 24, 30, 40):
        assert serving._jpeg_orientation(tf.constant(damaged[:cut])).numpy() == 1, cut
    assert serving._jpeg_orientation(tf.constant(damaged)).numpy() == 6


def _crafted_jpegs():
    """`(name, JPEG bytes, orientation a viewer applies)` for layouts phones and editors write,
    and damaged ones: what the image signatures and the folder loader must agree on."""
    import struct

    from PIL import Image
    out = io.BytesIO()
    Image.fromarray(np.full((8, 12), 200, np.uint8)).save(out, format="JPEG")
    plain = out.getvalue()

    def segment(marker, payload):
        return struct.pack(">HH", marker, len(payload) + 2) + payload

    def exif(entries, order=b"II", magic=42, prefix=b"Exif\0\0", extra=b""):
        form = "<" if order == b"II" else ">"
        ifd = struct.pack(form + "H", len(entries)) + b"".join(
            struct.pack(form + "HHI", tag, kind, count) + value for tag, kind, count, value in entries)
        return segment(0xFFE1, prefix + order + struct.pack(form + "HI", magic, 8) + ifd
                       + struct.pack(form + "I", 0) + extra)  # extra at 26 for one entry

    def short(value, order=b"II"):
        return struct.pack(("<" if order == b"II" else ">") + "HH", value, 0)

    def long(value, order=b"II"):
        return struct.pack(("<" if order == b"II" else ">") + "I", value)

    def jpeg(*segments):
        return plain[:2] + b"".join(segments) + plain[2:]

    orientation = exif([(0x0112, 3, 1, short(6))])
    xmp = segment(0xFFE1, b"http://ns.adobe.com/xap/1.0/\0<x:xmpmeta tiff:Orientation='3'/>")
    return [
        ("SHORT, little-endian", jpeg(orientation), 6),
        ("SHORT, big-endian", jpeg(exif([(0x0112, 3, 1, short(8, b"MM"))], b"MM")), 8),
        ("LONG, little-endian", jpeg(exif([(0x0112, 4, 1, long(5))])), 5),
        ("LONG, big-endian", jpeg(exif([(0x0112, 4, 1, long(7, b"MM"))], b"MM")), 7),
        ("SSHORT", jpeg(exif([(0x0112, 8, 1, short(2))])), 2),
        ("after other tags", jpeg(exif([(0x010F, 2, 4, b"cam\0"), (0x0112, 3, 1, short(3))])), 3),
        ("XMP segment first", jpeg(xmp, orientation), 6),
        ("a comment first", jpeg(segment(0xFFFE, b"hello"), orientation), 6),
        ("fill bytes first", jpeg(b"\xff\xff\xff", orientation), 6),
        ("a standalone marker first", jpeg(b"\xff\xd0", orientation), 6),
        ("no Exif", plain, 1),
        ("orientation 9", jpeg(exif([(0x0112, 3, 1, short(9))])), 1),
        ("orientation 0", jpeg(exif([(0x0112, 3, 1, short(0))])), 1),
        ("a BYTE", jpeg(exif([(0x0112, 1, 1, b"\x06\0\0\0")])), 1),
        ("two values: the first", jpeg(exif([(0x0112, 3, 2, struct.pack("<HH", 6, 3))])), 6),
        ("three values, elsewhere", jpeg(exif([(0x0112, 3, 3, long(26))],
                                              extra=struct.pack("<HHH", 4, 3, 2))), 4),
        ("another byte order mark", jpeg(exif([(0x0112, 3, 1, short(6))], b"XX")), 1),
        ("not TIFF's 42", jpeg(exif([(0x0112, 3, 1, short(6))], magic=43)), 1),
        ("not Exif", jpeg(exif([(0x0112, 3, 1, short(6))], prefix=b"Exit\0\0")), 1),
        ("cut in the IFD", jpeg(orientation)[:len(orientation) - 8], 1),
    ]


@pytest.mark.filterwarnings("ignore:Metadata Warning")  # PIL on the orientation of 2 and 3 values
def test_image_signatures_read_exif_orientations_as_the_folder_loader_does():
    from PIL import Image

    from tf_maml.tasks import sources
    for name, data, want in _crafted_jpegs():
        assert serving._jpeg_orientation(tf.constant(data)).numpy() == want, name
        try:
            with Image.open(io.BytesIO(data)) as image:
                assert sources._orientation(image) == want, name
        except OSError:  # a file PIL cannot open: the folder loader refuses it
            assert name == "cut in the IFD", name


def test_a_damaged_image_names_its_input(omniglot_signatures):
    """A header that reads well over damaged data fails in the decoder itself, whose error
    names its node: under the input's name."""
    rng = np.random.default_rng(4)
    good = _drawing(rng, 28)
    damaged = good[:40] + b"\0" * 20 + good[60:]
    adapt_images = tf.function(omniglot_signatures.adapt_images)
    labels = tf.constant([0, 1, 2])
    for support, query, name in (([good, good, damaged], [good], "support_images"),
                                 ([good, good, good], [damaged], "query_images")):
        with pytest.raises(tf.errors.InvalidArgumentError,
                           match=rf"(?s)Invalid PNG.*node decode_{name}/"):
            adapt_images(tf.constant(support), labels, tf.constant(query))


def test_adapt_images_names_its_own_inputs(omniglot_signatures):
    """A label count that did not match the images named support_x, which adapt_images
    does not take."""
    good = _drawing(np.random.default_rng(5), 28)
    adapt_images = tf.function(omniglot_signatures.adapt_images)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"support_y must have one label per support_images example; got "
                             r"label and example counts"):
        adapt_images(tf.constant([good] * 3), tf.constant([0, 1]), tf.constant([good]))


def test_image_signatures_refuse_huge_images_before_decoding(omniglot_signatures):
    """Sizes come from the headers: a small file of a huge blank image is not decompressed."""
    from PIL import Image

    def encoded(size, format, mode="L"):
        out = io.BytesIO()
        Image.new(mode, size, 255).save(out, format=format)
        return out.getvalue()

    for format in ("PNG", "JPEG", "GIF", "BMP"):
        for size in ((105, 105), (40, 3000), (4096, 4096)):
            decoded = omniglot_signatures.decode_images(tf.constant([encoded(size, format)]))
            assert decoded["x"].shape == (1, 28, 28, 1), (format, size)
    bomb = encoded((16000, 16000), "PNG", "1")
    assert len(bomb) < 100_000
    for format, size in (("PNG", (16000, 16000)), ("JPEG", (100, 5000)), ("GIF", (4097, 10)),
                         ("BMP", (10, 4097))):
        data = bomb if format == "PNG" else encoded(size, format)
        with pytest.raises(tf.errors.InvalidArgumentError, match="larger than 4096 pixels"):
            omniglot_signatures.decode_images(tf.constant([data]))
    # The size is read before decoding: the PNG's signature and header chunk alone (no pixel
    # data, which a decoder would fail on differently) get the same answer.
    with pytest.raises(tf.errors.InvalidArgumentError, match="larger than 4096 pixels"):
        omniglot_signatures.decode_images(tf.constant([bomb[:33]]))
    # Other formats (TensorFlow would decode WebP without a size check) are refused.
    for data in (encoded((9000, 20), "WEBP"), b"not an image", b""):
        with pytest.raises(tf.errors.InvalidArgumentError, match="not a PNG, JPEG, GIF or BMP"):
            omniglot_signatures.decode_images(tf.constant([data]))
    # GIF and BMP (decoded as RGB by TensorFlow) give a grayscale model the PNG's pixels.
    rng = np.random.default_rng(2)
    with Image.open(io.BytesIO(_drawing(rng, 105))) as page:
        formats = {}
        for format in ("PNG", "GIF", "BMP"):
            out = io.BytesIO()
            page.save(out, format=format)
            formats[format] = omniglot_signatures.decode_images(
                tf.constant([out.getvalue()]))["x"].numpy()
    np.testing.assert_array_equal(formats["GIF"], formats["PNG"])
    np.testing.assert_array_equal(formats["BMP"], formats["PNG"])
    # The next request is served.
    assert omniglot_signatures.decode_images(
        tf.constant([encoded((105, 105), "PNG")]))["x"].shape == (1, 28, 28, 1)


# -- B6: safe writes, no diverged models, no version 0 ------------------------------------------


class _FakeArchive:
    """Writes a marked "version" (and optionally dies half way), as `write_out` would."""

    def __init__(self, mark, crash=False):
        self.mark, self.crash = mark, crash

    def write_out(self, path, verbose=False):
        os.makedirs(os.path.join(path, "variables"))
        with open(os.path.join(path, "saved_model.pb"), "w") as f:
            f.write(self.mark)
        if self.crash:
            raise RuntimeError("killed while writing")
        with open(os.path.join(path, "variables", "variables.index"), "w") as f:
            f.write(self.mark)


def _version_mark(path):
    with open(os.path.join(path, "saved_model.pb")) as f:
        mark = f.read()
    with open(os.path.join(path, "variables", "variables.index")) as f:
        assert f.read() == mark  # complete
    return mark


def _system_swaps_directories(tmp_path):
    """Whether this system and file system swap two directories atomically, asked of the C
    library directly (not through `serving._exchange`, the code under test)."""
    a, b = tmp_path / "probe_a", tmp_path / "probe_b"
    os.makedirs(a / "in_a")
    os.makedirs(b)
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint]
    swapped = renameat2(-100, os.fsencode(a), -100, os.fsencode(b), 2) == 0  # RENAME_EXCHANGE
    assert swapped == os.path.isdir(b / "in_a")
    return swapped


def _counting_exchanges(monkeypatch):
    """Spies on `serving._exchange`; returns the list of its results."""
    results, real = [], serving._exchange

    def spy(a, b):
        results.append(real(a, b))
        return results[-1]

    monkeypatch.setattr(serving, "_exchange", spy)
    return results


@pytest.mark.parametrize("atomic", [True, False])
def test_overwrite_keeps_a_complete_version_in_place(atomic, tmp_path, monkeypatch):
    experiment = _experiment("sine_maml")
    if atomic and not _system_swaps_directories(tmp_path / "probe"):
        pytest.skip("this file system cannot swap directories atomically")
    exchanges = _counting_exchanges(monkeypatch)
    if not atomic:
        monkeypatch.setattr(serving, "_exchange", lambda a, b: False)
    monkeypatch.setattr(serving, "build_export_archive", lambda s: _FakeArchive("old"))
    path = serving.export(experiment, str(tmp_path), 3, 2)
    # A crash while the new version is written leaves the old one serving, untouched.
    monkeypatch.setattr(serving, "build_export_archive", lambda s: _FakeArchive("new", True))
    with pytest.raises(RuntimeError, match="killed"):
        serving.export(experiment, str(tmp_path), 3, 2, overwrite=True)
    assert _version_mark(path) == "old"
    # A complete new version replaces it; nothing is left beside it.
    monkeypatch.setattr(serving, "build_export_archive", lambda s: _FakeArchive("new"))
    assert serving.export(experiment, str(tmp_path), 3, 2, overwrite=True) == path
    assert _version_mark(path) == "new"
    assert sorted(os.listdir(tmp_path)) == (["3", "probe"] if atomic else ["3"])
    if atomic:  # the swap, not the rename-aside fallback, put the new version in place
        assert exchanges == [True]


def test_overwrite_never_leaves_the_version_missing(tmp_path, monkeypatch):
    """TF Serving polls the directory: at no moment may the version be absent."""
    experiment = _experiment("sine_maml")
    if not _system_swaps_directories(tmp_path / "probe"):
        pytest.skip("this file system cannot swap directories atomically")
    exchanges = _counting_exchanges(monkeypatch)
    tmp_path = tmp_path / "a"
    monkeypatch.setattr(serving, "build_export_archive", lambda s: _FakeArchive("v0"))
    path = serving.export(experiment, str(tmp_path), 1, 2)
    missing, done = [], threading.Event()

    def watch():
        while not done.is_set():
            if not os.path.exists(os.path.join(path, "saved_model.pb")):
                missing.append(time.perf_counter())

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for i in range(30):
            monkeypatch.setattr(serving, "build_export_archive",
                                lambda s, i=i: _FakeArchive(f"v{i + 1}"))
            serving.export(experiment, str(tmp_path), 1, 2, overwrite=True)
    finally:
        done.set()
        watcher.join()
    assert not missing
    assert _version_mark(path) == "v30"
    assert exchanges == [True] * 30


def test_export_refuses_non_finite_parameters_and_bad_versions(tmp_path):
    experiment = _classifier("metasgd")
    weight, rate = experiment.model.trainable_variables[0], experiment.algorithm.extra_variables[2]
    for variable in (weight, rate):
        saved = variable.numpy()
        variable.assign(np.where(np.arange(saved.size).reshape(saved.shape) == 1, np.nan,
                                 saved).astype(saved.dtype))
        try:
            with pytest.raises(ValueError, match="refusing to export: NaN or infinite values in "
                                                 f".*{variable.name}"):
                serving.export(experiment, str(tmp_path), 1, 3)
        finally:
            variable.assign(saved)
    assert not os.listdir(tmp_path)  # nothing written
    for version in (0, -3, True, 1.5, "2", 2**63):  # (TF Serving reads versions as int64)
        with pytest.raises(ValueError, match="version must be a positive integer"):
            serving.export(experiment, str(tmp_path), version, 3)
