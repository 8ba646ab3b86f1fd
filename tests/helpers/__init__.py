"""Test helpers: import them as ``from tests.helpers.optim import make_params``."""
