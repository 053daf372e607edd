"""`membership.write_private`, which writes the donor's node token (membership.json) and the cluster token: a
file left or planted at a temp name beside the target changes nothing (the temp file is always a new one)."""

from __future__ import annotations

import stat
from pathlib import Path

from rma_ray import membership


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_a_stale_world_readable_temp_file_does_not_loosen_the_secret(tmp_path: Path) -> None:
    target = tmp_path / "membership.json"
    stale = tmp_path / "membership.json.tmp"  # the name the old code wrote through, O_TRUNC keeping its mode
    stale.write_text("stale")
    stale.chmod(0o644)
    membership.write_private(target, '{"node_token": "rma_node_x_y"}')
    assert target.read_text() == '{"node_token": "rma_node_x_y"}'
    assert _mode(target) == 0o600
    assert stale.read_text() == "stale" and _mode(stale) == 0o644  # not touched, not used


def test_a_symlink_planted_at_the_temp_name_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("the victim's own data")
    victim.chmod(0o644)
    target = tmp_path / "cluster_token"
    (tmp_path / "cluster_token.tmp").symlink_to(victim)
    membership.write_private(target, "secret-token\n")
    assert victim.read_text() == "the victim's own data" and _mode(victim) == 0o644
    assert not target.is_symlink() and target.read_text() == "secret-token\n" and _mode(target) == 0o600


def test_an_existing_file_is_replaced_private_and_no_temp_file_is_left(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "membership.json"
    target.parent.mkdir()
    target.write_text("old")
    target.chmod(0o644)
    membership.write_private(target, b"new")
    assert target.read_bytes() == b"new" and _mode(target) == 0o600
    assert sorted(p.name for p in target.parent.iterdir()) == ["membership.json"]
