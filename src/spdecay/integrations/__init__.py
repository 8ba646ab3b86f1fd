"""Optional integrations (import the submodule you need; each imports its framework lazily).

* :mod:`spdecay.integrations.hf`: Hugging Face ``Trainer`` (optimizer factory, stats callback).
* :mod:`spdecay.integrations.lightning`: Lightning (stats callback).
"""
