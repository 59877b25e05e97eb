"""Temporary files and folders that become the user's files: written beside their final path,
renamed into place, with the permissions any new file of the user's gets.

``tempfile.mkstemp`` and ``mkdtemp`` make private entries (``-rw-------``, ``drwx------``)
whatever the umask; a saved model, checkpoint or h5ad kept those modes after the rename.
Here the mode is set to what ``open`` and ``mkdir`` would give: 0o666 or 0o777 less the umask.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def current_umask() -> int:
    """The process's umask, read without changing it where the system says it (Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore at once
    os.umask(mask)
    return mask


def temp_file(directory: Path, prefix: str, suffix: str = "") -> str:
    """A new empty file in ``directory`` (its path), with the umask's permissions."""
    fd, path = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=directory)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
    finally:
        os.close(fd)
    return path


def temp_dir(directory: Path, prefix: str) -> Path:
    """A new empty folder in ``directory``, with the umask's permissions."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=directory))
    path.chmod(0o777 & ~current_umask())
    return path
