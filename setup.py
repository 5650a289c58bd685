"""xlmr_mini: distil multilingual XLM-R classifiers into smaller students.

`kernels/` and `data/` sit at the top of the source tree but install inside the package, as
`xlmr_mini.kernels` and `xlmr_mini.data`: top-level names like `kernels` or `data` would collide
with other distributions (PyPI has a `kernels` package). `pip install -e .` maps the same names
onto the checkout's folders (setuptools' editable finder reads this package_dir), with no links.
"""
import re
from pathlib import Path

from setuptools import setup

# The version lives in xlmr_mini/__init__.py alone (read, not imported: importing needs torch).
VERSION = re.search(r'^__version__ = "([^"]+)"', Path(__file__).with_name("xlmr_mini").joinpath("__init__.py")
                    .read_text(encoding="utf-8"), re.M).group(1)

setup(
    name="xlmr_mini",
    version=VERSION,
    description="Plain-PyTorch toolkit for distilling multilingual XLM-R classifiers into smaller students",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["xlmr_mini", "xlmr_mini.kernels", "xlmr_mini.data"],
    package_dir={"xlmr_mini": "xlmr_mini", "xlmr_mini.kernels": "kernels", "xlmr_mini.data": "data"},
    install_requires=[
        # 2.11 (GPU image) to 2.13 (CPU build): an open upper bound would pull a newer CUDA torch.
        "torch>=2.11,<2.14",
        "triton>=3.6,<4; platform_system == 'Linux'",
        "tokenizers>=0.19",
        "safetensors>=0.4",
        "pyarrow>=14",
        "numpy>=1.24",
    ],
    # setuptools: tests build and install the package itself (tests/test_install.py).
    # tensorboard does not depend on torch (torch.utils.tensorboard writes through it).
    # pytest-xdist: setup.cfg runs the tests one worker per core, a test module per worker.
    extras_require={"test": ["pytest>=7", "pytest-xdist>=3", "transformers>=4.45", "setuptools>=70.1",
                             "matplotlib>=3.5", "tensorboard>=2.10"],
                    "plot": ["matplotlib>=3.5"],
                    "tensorboard": ["tensorboard>=2.10"]},
)
