from setuptools import find_packages, setup

setup(
    name="keras-fsp",
    version="0.3.0",
    description=(
        "Knowledge distillation for Keras 3: the FSP matrix (Yim et al. 2017), dense "
        "sequential FSP, FitNets hints, Hinton soft targets, attention transfer, "
        "decoupled KD, logit-standardised KD, DIST and the relational RKD, PKT and "
        "similarity-preserving KD, as loss terms switched in stages"
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["keras_fsp", "keras_fsp.*"]),
    python_requires=">=3.10",
    # Versions that install and work together (BUILD_NOTES.md).
    install_requires=[
        "keras>=3.15,<3.16",  # the Keras internals keras_fsp.compat uses were checked on 3.15
        "tensorflow>=2.21,<2.22",
        "tensorflow-datasets>=4.9,<5",
        "importlib_resources>=6",  # tensorflow-datasets 4.9 fails to load without it
        "numpy>=1.26",
        "absl-py>=2.1",
        "tf-keras-vis==0.8.7",
        "matplotlib>=3.8",  # the pictures (keras-fsp visualize, the demo)
    ],
    extras_require={
        # The offline Quickstart demo: bundled digits data and pictures.
        "demo": ["scikit-learn>=1.4"],
        # Writing ONNX (Keras converts through tf2onnx) and running the
        # exports: LiteRT's interpreter and ONNX Runtime (keras_fsp.export).
        "export": ["tf2onnx>=1.17", "onnx>=1.23", "onnxruntime>=1.32", "ai-edge-litert>=2.3"],
        # The tests run every export with its own runtime, and the TensorBoard callback.
        # keras-hub: the tests distil its backbones (built from configs, no download).
        "test": ["pytest>=8", "pytest-xdist>=3.5", "scikit-learn>=1.4", "tensorboard>=2.21",
                 "tf2onnx>=1.17", "onnx>=1.23", "onnxruntime>=1.32", "ai-edge-litert>=2.3",
                 "keras-hub>=0.20"],
        # TensorBoard logs (`keras-fsp ... --tensorboard`); TensorFlow 2.21 no longer brings it.
        "tensorboard": ["tensorboard>=2.21"],
        # The second test suite (the same tests on the JAX backend, CPU).
        "jax": ["jax[cpu]>=0.4.30"],
    },
    entry_points={"console_scripts": ["keras-fsp = keras_fsp.apps.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
