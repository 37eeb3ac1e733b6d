from setuptools import setup

# The project is configured in pyproject.toml; this shim serves tools that still call setup.py.
setup()
