from setuptools import find_packages, setup

setup(
    name="keras-wt",
    version="0.1.0",
    description="Deep learning without weight transport: feedback alignment, sign symmetry, "
    "weight mirror and Kolen-Pollack as drop-in Keras 3 layers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["keras_wt", "keras_wt.*"]),
    python_requires=">=3.10",
    install_requires=[
        "tensorflow>=2.16",
        "keras>=3",
        "numpy",
        "tensorflow-datasets",
        "importlib-resources",
        "matplotlib",
        "tensorboard",
    ],
    # keras-hub: the tests convert small keras-hub models built from configs (no downloads).
    # jax: the JAX backend (KERAS_BACKEND=jax), which the dev suite also tests.
    extras_require={"dev": ["pytest", "pytest-xdist", "keras-hub", "jax"], "jax": ["jax"]},
    entry_points={
        "console_scripts": [
            "keras-wt-train=keras_wt.app.cli:main",
            "keras-wt-plot=keras_wt.app.cli:plot_main",
            "keras-wt-sweep=keras_wt.app.cli:sweep_main",
        ]
    },
)
