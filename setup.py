"""Packages of the wheel; everything else is in pyproject.toml.

configs/ and launch/ stay at the top of the checkout, where the README, the tests and the launchers use them by
path; the wheel carries the same files as package data (megatron_pept/configs/*.yaml, megatron_pept/launch/*), so
an installed package resolves ``--config quickstart`` and ``include:`` between the shipped files, and
``megatron-pept-launch-dir`` prints where the launch scripts are. No copy is kept in the source tree.
"""

from setuptools import find_packages, setup

ASSETS = {"configs": ["*.yaml"], "launch": ["*.sh", "*.sbatch"]}

setup(
    packages=[*find_packages(include=["megatron_pept", "megatron_pept.*"]), *(f"megatron_pept.{a}" for a in ASSETS)],
    package_dir={f"megatron_pept.{a}": a for a in ASSETS},
    package_data={f"megatron_pept.{a}": patterns for a, patterns in ASSETS.items()},
)
