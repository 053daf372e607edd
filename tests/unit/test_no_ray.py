"""The unit suite's guard (tests/unit/conftest.py's autouse fixture): `ray.init` raises in every unit test,
so `unit/` never starts Ray. This test asks for no fixture: the guard applies by itself. No Ray."""

from __future__ import annotations

import pytest


def test_ray_init_raises_in_a_unit_test() -> None:
    import ray

    try:
        with pytest.raises(RuntimeError, match="unit tests must not start Ray"):
            ray.init(num_cpus=1, include_dashboard=False)
    finally:
        ray.shutdown()  # a no-op unless the guard failed and a Ray was started
    assert not ray.is_initialized()
