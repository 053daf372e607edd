"""The data stores' pins kept on the operator's machine (`<data_dir>/store-pins.json`, 0600), beside the GCS's
copy: the GCS starts again empty after `rma down`/`rma up` or a core token rotation, and a pinned store must
then still be created on its donor (deployments/stores/supervisor.py explains pinning)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("rma.stores")
__all__ = ["AWAITING_RESTORE", "PINS_FILE", "load_pins", "moved_pin", "save_pins"]


PINS_FILE = "store-pins.json"
# a moved store's pin, until its data is restored: the supervisor there starts it but hands its endpoint to
# nobody but the move (deployments/stores/supervisor.py). Never kept in the file: a marker left there by a
# copy taken mid-move would hold a store whose data came in back after the GCS started again empty
AWAITING_RESTORE = "awaiting_restore"


def load_pins(path: Path) -> dict[str, dict[str, Any]]:
    """The pins kept on the operator's machine (`<data_dir>/store-pins.json`): they outlive the GCS."""
    try:
        pins = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("store pins not read from %s: %s", path, exc)
        return {}
    return {k: v for k, v in pins.items() if isinstance(v, dict)} if isinstance(pins, dict) else {}


def save_pins(path: Path, pins: dict[str, dict[str, Any] | None]) -> None:
    """Merge `pins` (None: forget that store's pin) into the file, written whole, 0600; without a move's
    AWAITING_RESTORE marker."""
    kept = load_pins(path)
    for store, pin in pins.items():
        if pin is None:
            kept.pop(store, None)
        else:
            kept[store] = {k: v for k, v in pin.items() if k != AWAITING_RESTORE}
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(kept, indent=2) + "\n")
    os.replace(tmp, path)


def moved_pin(store: str, donor: str) -> dict[str, Any]:
    """The pin a move gives its store: the new donor, by label, its data not restored there yet."""
    return {
        "store": store,
        "donor": donor,
        "labelled": True,
        "node_id": None,
        "since": None,
        AWAITING_RESTORE: True,
    }
