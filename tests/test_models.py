"""Model loading: where a CPU model's weights are placed for decoding."""

from __future__ import annotations

import copy
import re
import sys

import pytest
import torch
from helpers import small_llama

from atskv.experiments.models import HUGE_PAGE, to_huge_pages

linux = pytest.mark.skipif(sys.platform != "linux", reason="transparent huge pages are Linux's")


def _mapping(addr: int) -> tuple[tuple[int, int], list[str]]:
    """The address range and VmFlags of this process's mapping that holds ``addr``."""
    found = None
    with open("/proc/self/smaps") as f:
        for line in f:
            m = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
            if m:
                lo, hi = int(m.group(1), 16), int(m.group(2), 16)
                found = (lo, hi) if lo <= addr < hi else None
            elif found and line.startswith("VmFlags:"):
                return found, line.split()[1:]
    raise AssertionError(f"no mapping holds {addr:#x}")


@linux
def test_loaded_cpu_weights_share_one_mapping_advised_for_huge_pages(tiny_model):
    params = list(tiny_model.parameters())
    ranges = {_mapping(p.data_ptr())[0] for p in params}
    assert len(ranges) == 1  # one mapping holds every weight
    (lo, hi), flags = _mapping(params[0].data_ptr())
    assert "hg" in flags  # madvise(MADV_HUGEPAGE)
    spans = sorted((p.data_ptr(), p.data_ptr() + p.numel() * p.element_size()) for p in params)
    assert spans[0][0] % HUGE_PAGE == 0 and all(a % 64 == 0 for a, _ in spans)
    assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:]))  # no overlap
    assert lo <= spans[0][0] and spans[-1][1] <= hi


@linux
@pytest.mark.parametrize("tie", [True, False])
def test_moving_the_weights_keeps_every_value_and_the_tie(tie):
    model = small_llama(tie)
    before = copy.deepcopy(model)
    x = torch.tensor([[1, 5, 7, 3]])
    moved = to_huge_pages(model)
    assert moved == sum(-(-p.numel() * p.element_size() // 64) * 64 for p in model.parameters())
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    for (name, a), (_, b) in zip(model.named_parameters(), before.named_parameters()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr(), name
        assert isinstance(a, torch.nn.Parameter)
    with torch.no_grad():
        assert torch.equal(model(x).logits, before(x).logits)
