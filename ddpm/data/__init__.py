"""Data: the data sets, the step-indexed batcher, image conversion. Builds on ``ddpm.errors`` only.

Public surface (import from the modules; this file imports nothing, so ``ddpm.config`` can read the
data-set table without importing torch):

- ``ddpm.data.datasets``: ``DATASETS`` (the one table: channels, size, classes, class names),
  ``load_dataset``, ``prepare_dataset``
- ``ddpm.data.batcher``: ``StepBatcher`` (batch k = f(seed, k, rank)), ``mix_seed`` (the one seed hash)
- ``ddpm.data.images``: ``to_uint8``, ``to_unit``, ``model_to_uint8``, ``make_grid``
"""
