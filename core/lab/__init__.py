"""The lab: code that measures the solvers, never needed to use them.

- ``bench``: the ``weightsmith bench`` command and its sub-commands; ``erase_bench``, ``erase_sweep``,
  ``merge_bench``, ``merge_sweep``, ``quality``: one module per bench;
- ``demo``: ``weightsmith demo`` on the embedded world; ``card``: the model card's figures;
- ``measures``: what the benches measure (the UNet k/v residual, drift, …), each defined once;
- ``tables``: how figures are printed (intervals, percentages, tables as text and HTML);
- ``reference``: the public UCE and IterIS algorithms, re-implemented as oracles for tests and benches;
- ``random_models``, ``random_loras``: seeded random models and LoRAs for tests and benches.

The lab may import the solvers (``erase``, ``merge``), the world and core's base; nothing below it
imports the lab (tests/test_layout.py).
"""
