"""``python -m hc_retrofit``: the same as the ``hc-retrofit`` command."""

from hc_retrofit.cli import main

if __name__ == "__main__":
    main()
