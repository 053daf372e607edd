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
__all__ = ["AWAITING_RESTORE", "PINS_FILE", "load_pins", "moved_pin", "save_pins", "served"]


PINS_FILE = "store-pins.json"
# a moved store's pin, until its data is restored: the supervisor there starts it but hands its endpoint to
# nobody but the move (deployments/stores/supervisor.py). Kept in the file too: a GCS that starts again empty
# between the move's switch and the new supervisor's first start (before the marker is in that donor's volume)
# is seeded from the file, and without the marker there the store would serve empty until the restore. The
# commands that end the wait write the file again without it (`rma stores move|serve|restore`); one that could
# not (the operator's machine lost that write) leaves the store waiting after a fresh GCS, which `rma stores
# serve` ends: a store held back, never an empty one served
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
    """Merge `pins` (None: forget that store's pin) into the file, written whole, 0600; a move's
    AWAITING_RESTORE marker is kept as it is."""
    kept = load_pins(path)
    for store, pin in pins.items():
        if pin is None:
            kept.pop(store, None)
        else:
            kept[store] = dict(pin)
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


def served(path: Path, store: str) -> None:
    """The store serves its data now (a move's restore, `rma stores serve|restore`): its kept pin loses the
    move's marker, so a GCS seeded from the file later does not hold it back. Nothing for a pin without it."""
    pin = load_pins(path).get(store)
    if pin is not None and pin.get(AWAITING_RESTORE):
        save_pins(path, {store: {k: v for k, v in pin.items() if k != AWAITING_RESTORE}})
