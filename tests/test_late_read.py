"""One-step-late host reads: the bookkeeping on the CPU (late=True), the real copies on CUDA."""
import pytest
import torch

from curriculum.late_read import LateRead


def test_on_the_cpu_values_are_read_at_once():
    r = LateRead([0.0])
    assert r.push(torch.tensor([3.0])) == [3.0]
    assert r.push(torch.tensor([5.0])) == [5.0] and r.latest() == [5.0]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_late_reads_return_the_previous_push_and_latest_catches_up(device):
    r = LateRead([7.0, 1.0], late=True if device == "cpu" else None)
    assert r.latest() == [7.0, 1.0]  # nothing pushed yet
    seen = []
    for i in range(1, 5):
        t = torch.tensor([float(i), float(-i)], device=device)
        seen.append(r.push(t))
        t.fill_(99.0)  # the pushed values were copied, not referenced
    assert seen == [[7.0, 1.0], [1.0, -1.0], [2.0, -2.0], [3.0, -3.0]]
    assert r.latest() == [4.0, -4.0]
