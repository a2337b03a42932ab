"""What runs before training, once per dataset: a dataset folder in its published layout
(``layouts.py``), real or synthetic (``synth*.py``: scenes drawn and rendered in a real
layout), packed into WebDataset shards (``pack.py``). Training reads only the shards
(``eglp_dist/data/``: the shard contract, sampling, planning and the two decode back-ends)."""
