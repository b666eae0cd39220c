"""Fencing on a memory node: per address space, the highest owner epoch seen.

A pager that owns a space opens it with its epoch (OPEN ``"epoch"``, `transport.wire`); the
node raises the space's fence to it and refuses OPENs, STOREs and FETCHes under lower epochs
with STALE_EPOCH (in C fault lanes too: `MemoryNode.fence_out`), so a pager that lost its
guest to a newer owner can neither overwrite nor read newer pages.
The fences survive a restart: ``fences.json`` next to the store's spaces, written atomically.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

log = logging.getLogger(__name__)

FILE = "fences.json"


class Fences:
    """``{space: epoch}``, persisted in ``root/fences.json``."""

    def __init__(self, root: str | Path) -> None:
        self.path = Path(root) / FILE
        self._lock = threading.Lock()
        try:
            doc = json.loads(self.path.read_text())
            self.epochs = {str(k): int(v) for k, v in doc.items()}
        except FileNotFoundError:
            self.epochs = {}
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            raise OSError(f"cannot read the fence table {self.path}: {exc}; move it away "
                          f"only if no pager owns a space on this node") from exc

    def get(self, space: str) -> int:
        return self.epochs.get(space, 0)

    def admit(self, space: str, epoch: int) -> bool:
        """True if ``epoch`` may write ``space`` (raising the fence to it); False: stale."""
        with self._lock:
            fence = self.epochs.get(space, 0)
            if epoch < fence:
                return False
            if epoch > fence:
                self.epochs[space] = epoch
                self._save()
                log.info("memnode: space %s fenced at epoch %d", space, epoch)
            return True

    def stale(self, space: str, epoch: int | None) -> bool:
        """True if a store under ``epoch`` (None: an unfenced handle) must be refused."""
        return epoch is not None and epoch < self.epochs.get(space, 0)

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(self.epochs, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
