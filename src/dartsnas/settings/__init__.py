"""The settings of every job, as plain dataclasses that import neither torch nor any engine.

One module per job, named like the engine that runs it (``settings.search_cnn`` holds what
``engine.search_cnn`` runs with), plus ``runtime`` (the options every job shares: device, threads,
run directory, logging) and ``choices`` (value sets the settings and the engines both need). The
command line builds its flags, help and errors from these modules alone, so ``dartsnas --help``
and ``dartsnas genotypes`` never pay for importing torch; the engines import their config from
here and still export it under its old name (``dartsnas.engine.search_cnn.SearchConfig``).
Field names and defaults are what run directories store, so they do not change.
"""
