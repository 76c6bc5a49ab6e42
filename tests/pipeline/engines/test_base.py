"""The engine contracts' shared helpers (no Ray): which errors leave the device unusable, and
the row fallback that must not hide them."""

import pytest
import torch

from pipeline.engines.base import generate_with_row_fallback, poisons_device
from pipeline.errors import EngineDead

LOST = [
    torch.AcceleratorError("CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be "
                           "asynchronously reported at some other API call"),
    RuntimeError("CUDA error: device-side assert triggered"),
    RuntimeError("CUDA error: unspecified launch failure"),
    RuntimeError("CUDA error: misaligned address"),
]
RECOVERABLE = [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("CUDA error: out of memory"),
    RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)"),
    ValueError("Input image size (7*7) doesn't match model (336*336)."),
    ValueError("CUDA error: not raised by torch"),
]


@pytest.mark.parametrize("error", LOST, ids=lambda e: str(e)[:40])
def test_a_lost_cuda_context_is_engine_dead_not_a_row_error(error):
    assert poisons_device(error)

    def run_batch(batch):
        raise error

    with pytest.raises(EngineDead, match="CUDA error"):
        generate_with_row_fallback(run_batch, ["row-a", "row-b"])


@pytest.mark.parametrize("error", RECOVERABLE, ids=lambda e: str(e)[:40])
def test_other_errors_leave_the_engine_serving(error):
    assert not poisons_device(error)


def test_an_engine_error_over_several_lines_is_the_rows_one_line_error():
    """A library's multi-line message (torch's shape errors, a CUDA OOM's advice) becomes the
    row's `error` on one line, `engine: <type>: <message>`, with error_kind `engine`."""
    from pipeline.records import PreparedRequest

    error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nIf reserved but unallocated "
                                   "memory is large try setting\r\nPYTORCH_CUDA_ALLOC_CONF=expandable_segments:True")
    request = PreparedRequest(id="r", prompt="p", input_ids=torch.arange(5).numpy(), image_tokens=0)

    def run_batch(batch):
        raise error

    [result] = generate_with_row_fallback(run_batch, [request])
    assert result.error == ("engine: OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. If reserved but "
                            "unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True")
    assert result.error_kind == "engine"
