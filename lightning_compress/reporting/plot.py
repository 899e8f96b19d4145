"""``python -m lightning_compress.reporting.plot RUN_DIR``: draw the report's figure as a PNG with matplotlib
(``compression_report.png``), from the ``compression_report.json`` a fit wrote there. Fits write the figure as a
dependency-free SVG (:mod:`lightning_compress.reporting.svg`); this is the same figure, rasterized, for whoever
wants a PNG. No Lightning needed at run time."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lightning_compress.reporting.publish import JSON_NAME, PLOT_NAME, write_plot


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("run_dir", type=Path, help=f"the directory holding {JSON_NAME}")
    args = parser.parse_args(argv)
    source = args.run_dir / JSON_NAME
    if not source.is_file():
        parser.error(f"`run_dir`={str(args.run_dir)!r} holds no {JSON_NAME}; allowed: a fit's run directory")
    written = write_plot(json.loads(source.read_text()), args.run_dir / PLOT_NAME)
    if written is None:
        print("matplotlib is not installed: no PNG (`pip install 'lightning-compress[plot]'`)", file=sys.stderr)
        return 1
    print(written)
    return 0


if __name__ == "__main__":
    sys.exit(main())
