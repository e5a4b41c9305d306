"""Package discovery only; everything else is in pyproject.toml.

kernels/ sits at the top level (the product's layout) but imports as ``textcraftor_fast.kernels``: a top-level
import name ``kernels`` would clash with an existing PyPI package. pyproject's ``packages.find`` cannot add a
mapped package beside namespace discovery of the shipped data folders, so the list is built here.
"""
from setuptools import find_namespace_packages, setup

setup(
    packages=find_namespace_packages(include=["textcraftor_fast*"]) + ["textcraftor_fast.kernels"],
    package_dir={"textcraftor_fast.kernels": "kernels"},
)
