"""benchmarks/q8_0_headroom.py's GPTQ rounding: it writes what a Q8_0 file can hold, and it differs from ggml's
reference rounding only by carrying rounding errors between columns."""

from __future__ import annotations

import pytest
import torch
from conftest import benchmark_script


@pytest.fixture(scope="module")
def headroom():
    return benchmark_script("q8_0_headroom")


def weights(rows: int = 24, columns: int = 96) -> torch.Tensor:
    return torch.randn(rows, columns, generator=torch.Generator().manual_seed(0)) * 0.05


def test_with_uncorrelated_inputs_gptq_is_the_reference_rounding(headroom):
    w = weights()
    # Identity second moments: no column's error is carried into another, so each weight is rounded on its own.
    rounded = headroom.dequantized(*headroom.gptq_q8_0(w, torch.eye(w.shape[1], dtype=torch.float64)))
    assert torch.equal(rounded, headroom.reference_q8_0(w))


def test_gptq_stays_on_the_q8_0_grid_and_lowers_the_output_error_on_its_inputs(headroom):
    w = weights()
    generator = torch.Generator().manual_seed(1)
    mixing = torch.randn(w.shape[1], w.shape[1], generator=generator)
    inputs = torch.randn(512, w.shape[1], generator=generator) @ mixing  # correlated columns, as activations are
    levels, scales = headroom.gptq_q8_0(w, (inputs.T @ inputs).double())
    assert torch.equal(levels, levels.round()) and levels.min() >= -128 and levels.max() <= 127
    assert scales.dtype == torch.float16 and scales.shape == (w.shape[0], w.shape[1] // 32)
    output_error = ((inputs @ (headroom.dequantized(levels, scales) - w).T) ** 2).mean()
    reference_error = ((inputs @ (headroom.reference_q8_0(w) - w).T) ** 2).mean()
    assert output_error < 0.7 * reference_error, (output_error, reference_error)
