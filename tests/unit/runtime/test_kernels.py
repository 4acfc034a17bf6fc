"""The compiled loops against numpy references: float16 widening of every bit pattern, batched
folds of mixed dtypes and odd sizes, strided regions, and sums of squares that keep inf and NaN."""

from __future__ import annotations

import numpy as np
import pytest
from pollinate_runtime import kernels


def every_half() -> np.ndarray:
    return np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)


def test_widening_matches_numpy_for_every_float16_bit_pattern():
    halves = every_half().reshape(256, 256)
    widened = kernels.to_float32(halves)
    expected = halves.astype(np.float32)
    finite = np.isfinite(expected)
    np.testing.assert_array_equal(widened.view(np.uint32)[finite], expected.view(np.uint32)[finite])
    np.testing.assert_array_equal(np.isnan(widened), np.isnan(expected))
    np.testing.assert_array_equal(np.isinf(widened) & (widened > 0), np.isinf(expected) & (expected > 0))


@pytest.mark.parametrize("count", [1, 3, 4, 7, 9])
def test_fold_matches_a_float64_reference_for_any_number_of_updates(count):
    rng = np.random.default_rng(count)
    size = kernels.FOLD_BLOCK * 2 + 12345  # a partial last block
    updates = [(rng.standard_normal(size) * 0.01).astype(np.float16 if k % 3 else np.float32)
               for k in range(count)]
    weights = list(rng.uniform(0.5, 300, count))
    acc = np.full(size, 0.25, np.float32)
    kernels.fold(acc, updates, weights)
    expected = 0.25 + sum(w * u.astype(np.float64) for w, u in zip(weights, updates, strict=True))
    np.testing.assert_allclose(acc, expected, rtol=1e-5, atol=1e-6)


def test_fold_keeps_float16_subnormals_exact():
    tiny = np.array([2.0**-24, -(2.0**-20), 6.0e-5, 0.0], np.float16)
    acc = np.zeros(4, np.float32)
    kernels.fold(acc, [tiny], [1.0])
    np.testing.assert_array_equal(acc, tiny.astype(np.float32))


def test_fold_refuses_updates_of_another_size_or_dtype():
    acc = np.zeros(8, np.float32)
    with pytest.raises(ValueError, match="9 values"):
        kernels.fold(acc, [np.zeros(9, np.float16)], [1.0])
    with pytest.raises(TypeError, match="float16 or float32"):
        kernels.fold(acc, [np.zeros(8, np.float64)], [1.0])
    with pytest.raises(ValueError, match="2 updates but 1 weights"):
        kernels.fold(acc, [np.zeros(8, np.float16)] * 2, [1.0])


def test_fold_rows_adds_into_a_strided_region_only():
    rng = np.random.default_rng(1)
    dst = np.ones((6, 5), np.float32)
    src = rng.standard_normal((6, 2)).astype(np.float16)
    kernels.fold_rows(dst[:, :2], src, 3.0)
    np.testing.assert_allclose(dst[:, :2], 1 + 3 * src.astype(np.float32), rtol=1e-6)
    np.testing.assert_array_equal(dst[:, 2:], 1.0)


def test_sum_of_squares_matches_float64_and_propagates_inf_and_nan():
    rng = np.random.default_rng(2)
    values = (rng.standard_normal(3 * kernels.REDUCE_BLOCK + 7)).astype(np.float16)
    expected = float((values.astype(np.float64) ** 2).sum())
    assert kernels.sum_of_squares(values) == pytest.approx(expected, rel=1e-6)
    for bad in (np.inf, -np.inf, np.nan):
        poisoned = values.copy()
        poisoned[-1] = bad
        assert not np.isfinite(kernels.sum_of_squares(poisoned))
    # The largest finite half squared fits float32; a huge float32 overflows to inf.
    assert np.isfinite(kernels.sum_of_squares(np.full(1000, 65504, np.float16)))
    assert kernels.sum_of_squares(np.array([1e30], np.float32)) == np.inf


def test_fold_can_overwrite_garbage_and_scale_in_the_same_pass():
    rng = np.random.default_rng(3)
    size = kernels.FOLD_BLOCK + 99
    updates = [rng.standard_normal(size).astype(np.float16) for _ in range(5)]
    acc = np.full(size, np.nan, np.float32)  # np.empty could hold anything
    kernels.fold(acc, updates, [1.0, 2.0, 3.0, 4.0, 5.0], overwrite=True, scale=1 / 15)
    expected = sum(w * u.astype(np.float64) for w, u in zip(range(1, 6), updates, strict=True)) / 15
    np.testing.assert_allclose(acc, expected, rtol=1e-5, atol=1e-6)
