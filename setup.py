"""The package list, found (the rest of the build is in pyproject.toml): every package under mmtx/, and conf/
shipped as `mmtx.conf`."""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["mmtx", "mmtx.*"]), "mmtx.conf"])
