from __future__ import annotations

import pytest

from rma_ray import credentials
from rma_ray.credentials import Kind, MalformedToken


@pytest.mark.parametrize("kind", list(Kind))
def test_mint_parse_roundtrip(kind: Kind) -> None:
    minted = credentials.mint(kind)
    assert minted.token.startswith(f"rma_{kind}_{minted.id}_")
    parsed = credentials.parse(minted.token, kind)
    assert parsed.id == minted.id
    assert credentials.matches(parsed, minted.hash)
    assert minted.hash != parsed.secret and len(minted.hash) == 64
    assert parsed.secret not in minted.display()


def test_wrong_secret_does_not_match() -> None:
    a, b = credentials.mint(Kind.NODE), credentials.mint(Kind.NODE)
    assert not credentials.matches(credentials.parse(a.token, Kind.NODE), b.hash)


@pytest.mark.parametrize(
    "token",
    [
        "",
        "garbage",
        "rma_join_abc_def",
        "rma_join_" + "g" * 12 + "_" + "0" * 64,
        "Bearer rma_join_x",
        "rma_join_" + "a" * 12 + "_" + "0" * 63,
    ],
)
def test_malformed_tokens_are_refused(token: str) -> None:
    with pytest.raises(MalformedToken):
        credentials.parse(token, Kind.JOIN)


def test_kind_mismatch_says_what_it_is() -> None:
    node = credentials.mint(Kind.NODE).token
    with pytest.raises(MalformedToken, match="node credential, not a join"):
        credentials.parse(node, Kind.JOIN)


def test_malformed_message_never_echoes_the_secret() -> None:
    token = credentials.mint(Kind.ADMIN).token
    with pytest.raises(MalformedToken) as info:
        credentials.parse(token, Kind.CLIENT)
    assert token.split("_")[3] not in str(info.value)
