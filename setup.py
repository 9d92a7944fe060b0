from pathlib import Path

from setuptools import setup

version = {}
exec(Path("dds_fast/_version.py").read_text(), version)

setup(
    name="dds-fast",
    version=version["__version__"],
    description="Triton kernels and module API for dynamic slimmable networks (DDS-Net denoiser)",
    long_description=Path("README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # kernels/ and training/ keep their folders but install under the dds_fast namespace,
    # so no generic top-level name ("kernels" exists on PyPI) lands in site-packages.
    packages=["dds_fast", "dds_fast.kernels", "dds_fast.training"],
    package_dir={"dds_fast": "dds_fast", "dds_fast.kernels": "kernels", "dds_fast.training": "training"},
    package_data={"dds_fast": ["weights/*.safetensors"]},
    install_requires=[
        # tested: torch 2.13 with Triton 3.9 and 2.11 with 3.6 in CI, 2.8 with 3.4 once (README);
        # torch 2.4 with Triton 3.0 failed 90 kernel and model tests
        "torch>=2.8",
        "triton>=3.4; platform_system == 'Linux'",
        "numpy",
        "safetensors",
        "scikit-image",
        "scipy",
        "pillow",
        "tifffile",
        "imagecodecs",  # tifffile's codecs: LZW- and JPEG-compressed TIFFs
        "pypng",
        "tqdm",
    ],
    extras_require={
        "bench": ["matplotlib", "bm3d"],  # bm3d: benchmarks/quality.py's classical baseline
        # cuda-bindings: the CUDA-driver way to conditional graph nodes (torch 2.11's) against a stand-in driver
        "test": ["pytest", "pytest-benchmark", "pytest-xdist", "hypothesis", "matplotlib", "imageio",
                 "cuda-bindings>=13"],
    },
    entry_points={"console_scripts": ["dds-fast=dds_fast.cli:main"]},
)
