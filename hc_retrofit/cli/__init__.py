"""The ``hc-retrofit`` command line: a thin layer over the Python API (see :mod:`hc_retrofit.cli.app`)."""
