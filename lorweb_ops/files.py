"""Writing a file whole: an interrupted write never leaves a torn file under the final name."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def write_whole(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """``write(temporary)`` then rename onto ``path``; on failure (full disk, Ctrl-C) the temporary file goes.

    The temporary name is the process' own: processes of one torchrun / accelerate launch may write the same
    file at the same time, and the last rename wins with a whole file.
    """
    path = Path(path)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.partial")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
