from setuptools import find_packages, setup

setup(
    name="tf_maml",
    version="0.2.0",
    description="Model-Agnostic Meta-Learning (MAML) for any Keras 3 model, in TensorFlow",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["tf_maml", "tf_maml.*"]),
    python_requires=">=3.10",
    # TensorFlow itself comes from an extra: `tensorflow` (the full build,
    # GPU-capable on Linux) or `tensorflow-cpu` (smaller); pip cannot tell that
    # one satisfies the other, so neither is a hard requirement.
    install_requires=[
        "keras>=3.0,<4",  # functional.py and compat.py rely on Keras 3 internals
        "numpy",
        "absl-py",
        "tensorboard",
        "matplotlib",
        "pillow>=9.1",  # Image.Transpose
        "tensorflow-datasets",
        # TFDS imports it when it downloads a dataset but does not require it.
        "importlib_resources",
    ],
    extras_require={
        "tf": ["tensorflow>=2.16"],
        "cpu": ["tensorflow-cpu>=2.16"],
        # pytest-xdist: the suite runs on two processes (README, Tests); --dist worksteal
        # needs 3.2.
        "test": ["pytest", "pytest-xdist>=3.2"],
        # The peers of bench/meta_step.py and bench/serving_latency.py. learn2learn is
        # built by hand (its sdist does not build on Python >= 3.11): see bench/peers.py.
        # It imports gym and torchvision.
        "peers": ["torch", "torchvision", "gym", "higher", "jax"],
        # Meta-RL locomotion (HalfCheetah goal velocity/direction): Gymnasium's MuJoCo
        # environments, the maintained successors of the rllab ones the paper used.
        "rl": ["gymnasium[mujoco]>=1.0,<2"],
    },
    entry_points={
        "console_scripts": [
            "tf_maml_train=tf_maml.train:run",
            "tf_maml_evaluate=tf_maml.evaluate:run",
            "tf_maml_export=tf_maml.export:run",
        ],
    },
)
