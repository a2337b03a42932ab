"""The studies, benchmarks and the GPU check: each a module with ``main(argv)``, run by
``eglp ablate`` / ``eglp bench WHAT``, by ``python -m eglp_dist.runners.NAME`` or by the thin
``tools/NAME.py`` of a checkout (the modules are importable by their workers in spawned ranks)."""
