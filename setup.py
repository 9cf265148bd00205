"""Packaging for pman: one module, no dependencies."""
import os
import re

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def read(name):
    with open(os.path.join(HERE, name), encoding="utf-8") as f:
        return f.read()


# The version is read from the source, never by importing the module.
VERSION = re.search(r'^__version__ = "([^"]+)"', read("pman.py"), re.M).group(1)

setup(
    name="pman",
    version=VERSION,
    description="A process manager for shell jobs in one standard-library module, "
                "with the original pman HTTP API",
    long_description=read("README.rst"),
    long_description_content_type="text/x-rst",
    license="MIT",
    py_modules=["pman"],
    python_requires=">=3.9",
    entry_points={"console_scripts": ["pman = pman:main"]},
    extras_require={"test": ["pytest"]},
    classifiers=[
        "License :: OSI Approved :: MIT License",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
    ],
)
