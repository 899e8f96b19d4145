"""``python -m lightning_compress fit ...``: the same as the ``lightning-compress`` console script."""

from lightning_compress.cli import main

if __name__ == "__main__":
    main()
