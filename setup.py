"""Installs kd_keras; the metadata and dependencies are in setup.cfg."""

import setuptools

setuptools.setup()
