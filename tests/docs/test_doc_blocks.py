"""Every command block of README.md, SECURITY.md and docs/*.md, run in page order against the doc tests'
pool (tests/docs/conftest.py), on the machine the page names (head, donor or client). A block marked `skip` in
its page is reported as a skip with the page's reason; one whose command fails (or prints less than its
`expect`) fails."""

from __future__ import annotations

import re

import pytest

from tests.docs.conftest import ROOT, DocPool
from tests.docs.mdblocks import Block
from tests.docs.pages import all_blocks

# the first block also waits for the pool to start (up to two tries on a busy box)
pytestmark = [pytest.mark.ray, pytest.mark.docs, pytest.mark.timeout(900)]

BLOCKS = [b for b in all_blocks() if b.runnable]


def covered_by_exists(nodeid: str) -> bool:
    """`tests/x.py::test_name` (or `::Class::test_name`) names a test function that exists in that file."""
    path, _, rest = nodeid.partition("::")
    file = ROOT / path
    if not (file.is_file() and rest):
        return False
    name = rest.split("::")[-1].split("[")[0]
    return re.search(rf"^\s*(async\s+)?def {re.escape(name)}\(", file.read_text(), re.M) is not None


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_doc_block(block: Block, request: pytest.FixtureRequest) -> None:
    if block.skip:
        covered = block.options.get("covered-by")
        for nodeid in filter(None, (covered or "").split(",")):
            assert covered_by_exists(nodeid.strip()), f"{block.id}: covered-by names no test: {nodeid}"
        pytest.skip(block.options["reason"] + (f"; covered by {covered}" if covered else ""))
    pool: DocPool = request.getfixturevalue("docpool")
    pool.run(block)
