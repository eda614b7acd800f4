import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# tf_maml first, as a user's program would: on x86-64 it turns TensorFlow's oneDNN kernels on
# (TF_ENABLE_ONEDNN_OPTS=1, unless set) before TensorFlow is imported, which Keras does.
import tf_maml  # noqa: E402, F401
import keras  # noqa: E402
import pytest  # noqa: E402

# The real Omniglot archives (.ci/run sets it): tests that need them are skipped when it is
# unset and fail when it is set but the files are missing.
OMNIGLOT_ENV = "TF_MAML_OMNIGLOT_DIR"


@pytest.fixture(scope="session")
def omniglot_dir():
    """The directory of the real Omniglot archives, from TF_MAML_OMNIGLOT_DIR."""
    path = os.environ.get(OMNIGLOT_ENV)
    if not path:
        pytest.skip(f"{OMNIGLOT_ENV} is not set")
    for name in ("images_background.zip", "images_evaluation.zip"):
        if not os.path.isfile(os.path.join(path, name)):
            pytest.fail(f"{OMNIGLOT_ENV}={path} but {name} is missing there")
    return path


@pytest.fixture(scope="session")
def omniglot_cache_dir(tmp_path_factory):
    """One decoded-image cache for the tests that load the real archives (decoding takes
    seconds each time)."""
    return str(tmp_path_factory.mktemp("omniglot_cache"))


@pytest.fixture(scope="session")
def omniglot_characters(omniglot_dir, omniglot_cache_dir):
    """`omniglot.load_characters` of the real archives: `(images, background)`."""
    from tf_maml.tasks import omniglot
    return omniglot.load_characters(omniglot_dir, omniglot_cache_dir)


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(1234)
    yield


@pytest.fixture
def start_steps(monkeypatch):
    """The step each `trainer.train` call starts (or resumes) training from."""
    starts = []
    from tf_maml import tasks as tasks_lib
    real = tasks_lib.episode_dataset

    def spy(sample_fn, seed, start_step, num_steps, stream=0):
        starts.append(start_step)
        return real(sample_fn, seed, start_step, num_steps, stream)

    monkeypatch.setattr(tasks_lib, "episode_dataset", spy)
    return starts


@pytest.fixture
def offline(monkeypatch):
    """No network and no proxy: every connection fails as on a machine without DNS. Returns
    the `(host, port)` of each attempt."""
    import socket
    import urllib.request
    attempts = []

    def refuse(address, *args, **kwargs):
        attempts.append(address)
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(urllib.request, "getproxies", lambda: {})
    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


def _reserve_ports(n):
    """Picks `n` local TCP ports that no other program is handed for about a minute.

    A port found free and released can be taken by another program (an outgoing
    connection's local port, another test's server) before the test's server binds it.
    Each port here is left in TIME_WAIT by a connection closed from its server's side
    (as Yelp's ephemeral-port-reserve does): the kernel hands it to no one else until
    that ends, while a server that sets SO_REUSEADDR, as gRPC's does, can bind it.
    """
    import socket
    ports = []
    for _ in range(n):
        with socket.socket() as server:
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            server.bind(("127.0.0.1", 0))
            server.listen(1)
            port = server.getsockname()[1]
            with socket.socket() as client:
                client.connect(("127.0.0.1", port))
                accepted, _ = server.accept()
                accepted.close()  # this side closes first: its port goes to TIME_WAIT
        ports.append(port)
    return ports


@pytest.fixture
def free_ports():
    """Returns a function of `n` that gives `n` local ports reserved for the test's servers
    (see `_reserve_ports`)."""
    return _reserve_ports
