"""Kept-tile lists from packed patterns: Triton kernel (compiled on a GPU, else the interpreter) == unpack_bits + kv_lists."""
import pytest
import torch

from attention_backends.ops.pattern_lists import pattern_lists
from attention_backends.sparsed_pattern import kv_lists, pack_bits
from tests.kernel_env import DEVICE


@pytest.mark.parametrize("nk,density", [(1, 1.0), (7, 0.5), (13, 0.3), (64, 0.1), (100, 0.9), (100, 0.0)])
def test_lists_equal_the_reference(nk, density):
    g = torch.Generator().manual_seed(nk)
    mask = torch.rand(3, nk, nk, generator=g) < density
    mask[0, 0] = True                      # one full row
    want_num, want_idx = kv_lists(mask)
    num, idx = (x.cpu() for x in pattern_lists(pack_bits(mask).to(DEVICE), nk, nk + 5))
    assert idx.shape == (3, nk, nk + 5)
    assert torch.equal(num, want_num)
    for h in range(3):
        for q in range(nk):
            n = int(num[h, q])
            assert torch.equal(idx[h, q, :n], want_idx[h, q, :n]), (h, q)


def test_bad_shapes_are_refused():
    bits = pack_bits(torch.ones(2, 9, 9, dtype=torch.bool)).to(DEVICE)
    with pytest.raises(ValueError, match="width=8 < 9"):
        pattern_lists(bits, 9, 8)
    with pytest.raises(ValueError, match="do not hold 20 key blocks"):
        pattern_lists(bits, 20, 20)
