"""Executors that run a study's units somewhere other than this process (the optional ``ray``
extra). Importing this package never imports Ray: ``executor_from_options`` checks the options and imports
Ray only when ``--workers`` or ``--ray-address`` is given."""

from spdecay.experiments.workers.factory import executor_from_options
from spdecay.experiments.workers.options import RayOptions

__all__ = ["RayOptions", "executor_from_options"]
