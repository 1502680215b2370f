"""`python -m tests.e2e.faults.paused_write MARKER STAGE [front-end flags]`: the real front end
(`frontend.__main__.main`), except that the first result write stops at STAGE and waits there for the
test to SIGKILL the process - a crash at a known point of `frontend.files.atomic_write`:

- `mid_write`: the temporary file holds half of the mp4 (truncated to half, as if the rest never reached the
  disk), nothing has been renamed;
- `after_replace`: the complete mp4 is in place, the task record does not know yet.

MARKER is a file written when the stage is reached. Only the wrapped functions differ; everything else is
the product as shipped.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from frontend.__main__ import main


def pause_forever(marker: Path, stage: str) -> None:
    marker.write_text(stage, encoding="utf-8")
    while True:
        time.sleep(3600)


def install(marker: Path, stage: str) -> None:
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(descriptor: int) -> None:
        if stage == "mid_write" and not marker.exists():
            os.ftruncate(descriptor, os.fstat(descriptor).st_size // 2)
            pause_forever(marker, stage)
        real_fsync(descriptor)

    def replace(source, target, **kwargs) -> None:
        real_replace(source, target, **kwargs)
        if stage == "after_replace" and str(target).endswith(".mp4") and not marker.exists():
            pause_forever(marker, stage)

    os.fsync, os.replace = fsync, replace


if __name__ == "__main__":
    marker_path, stage_name, *flags = sys.argv[1:]
    if stage_name not in ("mid_write", "after_replace"):
        raise SystemExit(f"unknown stage {stage_name!r}")
    install(Path(marker_path), stage_name)
    main(flags)
