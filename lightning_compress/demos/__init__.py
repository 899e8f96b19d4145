"""Demo models and bundled-data datamodules for the built-in job, examples and tests (as ``lightning.pytorch.demos``).

They are not part of the compression algorithms: nothing outside ``demos``, ``cli`` and the tests imports them.
"""

from lightning_compress.demos.data import DigitsDataModule, MNIST5kDataModule
from lightning_compress.demos.models import MLPClassifier, SmallCNN

__all__ = ["DigitsDataModule", "MLPClassifier", "MNIST5kDataModule", "SmallCNN"]
