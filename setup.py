"""Only the optional C extension: every other piece of metadata is static, in
pyproject.toml. Without a C compiler the build still succeeds and stargate
runs on its pure Python path (``optional=True``)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("stargate._speedups", ["stargate/_speedups.c"], optional=True)
    ],
)
