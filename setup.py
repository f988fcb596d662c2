from setuptools import setup

setup(
    name="fastres",
    version="0.1.0",
    description="High-throughput CIFAR-10 ResNet trainer: FFCV data, device-side augmentation, "
                "AMP, torch.compile and Triton kernels.",
    python_requires=">=3.11",
    packages=["fastres", "kernels", "data_prep", "bench"],
    install_requires=[
        "torch>=2.4,<=2.14.1",
        "torchvision>=0.19,<=0.29.1",
        "ffcv==1.0.2",
        "numba>=0.60",
        "triton; platform_system=='Linux'",
        "numpy>=1.24",
        "pillow",  # ffcv imports PIL but does not declare it
        "tqdm",
        "matplotlib",
        "torchinfo>=1.8",  # fastres summary: the model's layer table, parameters and multiply-adds
        "optuna>=4.9",  # fastres sweep: the study, its storage, samplers, pruners, heartbeats and retries (RetryHeartbeatStaleTrialCallback)
    ],
    # tensorboard: optional for users (--tensorboard); the tests read back what it writes.
    # pytest-xdist: the test command runs the tests in 2 processes (`pytest -n 2`).
    # postgres: a PostgreSQL server as the study storage shared by several machines.
    extras_require={"postgres": ["psycopg[binary]>=3.1"],
                    "test": ["pytest>=7", "pytest-benchmark>=4", "pytest-xdist>=3", "tensorboard",
                             "psycopg[binary]>=3.1"]},
    entry_points={
        "console_scripts": [
            "fastres=fastres.cli:main",
            "fastres-prep=data_prep.cli:main",
        ]
    },
)
