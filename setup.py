"""Kept as the entry point users know (`pip install -e .`); metadata lives in pyproject.toml."""
from setuptools import setup

setup()
