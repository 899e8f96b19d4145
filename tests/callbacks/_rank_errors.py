"""A mixin for DDP tests of a callback's ``setup`` refusals: each rank writes the error it ended with into
``folder``; rank zero waits for rank one's before raising (the spawn launcher stops the other processes as soon as
one ends). Subclasses live at module level: ddp_spawn pickles them."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any


class SetupErrorFile:
    folder = ""

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        try:
            super().setup(trainer, pl_module, stage)  # type: ignore[misc]
        except Exception as err:
            Path(self.folder, f"rank{trainer.global_rank}.err").write_text(f"{type(err).__name__}: {err}")
            deadline = time.monotonic() + 60
            while trainer.is_global_zero and not Path(self.folder, "rank1.err").exists() \
                    and time.monotonic() < deadline:
                time.sleep(0.1)
            raise
