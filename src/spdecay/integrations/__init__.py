"""Optional integrations (import the submodule you need; each imports its framework lazily).

* ``spdecay.integrations.hf``: Hugging Face ``Trainer`` (optimizer factory, stats callback).
* ``spdecay.integrations.lightning``: Lightning (stats callback).
* ``spdecay.integrations.deepspeed``: DeepSpeed ZeRO 1/2/3 (``attach(engine)``: per-layer SPD
  on flat partitions; ``attach_to_trainer(trainer)`` for the HF Trainer).
"""
