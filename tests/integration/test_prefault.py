"""Stream's prefault on a real lab host: it touches what it is asked (MADV_POPULATE_WRITE, or
one write per page where the kernel lacks it), then exits and frees it."""

from __future__ import annotations

import re

import pytest

from orchestrator import lab as labmod
from orchestrator.criu import pagechannel
from tests.labkit import on

pytestmark = pytest.mark.lab


@pytest.mark.parametrize("advice", ["23", "99999"])  # MADV_POPULATE_WRITE; one no kernel has
def test_prefault_touches_then_frees(lab: labmod.Lab, advice: str) -> None:
    argv = pagechannel.prefault_argv(48)
    argv[argv.index(pagechannel.PREFAULT)] = pagechannel.PREFAULT.replace("(23)", f"({advice})")
    out = on(lab, "host-b", '"$@"', *argv)
    assert re.fullmatch(r"prefaulted 48 MiB in \d+ ms\n", out), out
