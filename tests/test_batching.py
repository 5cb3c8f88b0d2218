"""The adaptive batch size: out-of-memory back-off in the perturbation and gradient loops."""

from __future__ import annotations

import pytest
import torch
from conftest import images_for, tiny_vit

from vitxai.batching import AdaptiveBatch, is_out_of_memory, run_chunked
from vitxai.methods import attribute


def squares(calls: list[tuple[int, int]], limit: int, error: BaseException | None = None):
    """fn(lo, hi) → (lo..hi−1)², raising an out-of-memory error for chunks above ``limit``."""

    def fn(lo: int, hi: int) -> torch.Tensor:
        calls.append((lo, hi))
        if hi - lo > limit:
            if error is None:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            raise error
        return torch.arange(lo, hi) ** 2

    return fn


def test_backs_off_and_settles():
    calls: list[tuple[int, int]] = []
    batcher = AdaptiveBatch(16)
    out = batcher.run(squares(calls, 5), 37)
    assert torch.equal(torch.cat(out), torch.arange(37) ** 2)  # same as one unchunked call
    assert batcher.size <= 5 and batcher.backoffs == 2  # 16 → 8 → 4
    # the failed chunk is retried from the same row, then the settled size is kept
    assert calls[:3] == [(0, 16), (0, 8), (0, 4)]
    assert all(hi - lo <= 4 for lo, hi in calls[3:])
    assert calls[-1][1] == 37


def test_cpu_allocator_message_and_consume_counts_each_row_once():
    cpu = RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't "
                       "allocate memory: you tried to allocate 123456789 bytes.")
    assert is_out_of_memory(cpu) and is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    seen: list[int] = []
    values = run_chunked(squares([], 3, cpu), 10, 8,
                         consume=lambda lo, hi, v: seen.extend(range(lo, hi)))
    assert values == [] and seen == list(range(10))


def test_other_errors_pass_through_and_floor_reraises():
    with pytest.raises(ValueError, match="boom"):
        run_chunked(lambda lo, hi: (_ for _ in ()).throw(ValueError("boom")), 4, 2)
    with pytest.raises(torch.OutOfMemoryError, match="smallest allowed is 4") as info:
        run_chunked(squares([], 2), 20, 16, min_batch=4)
    assert "\n" not in str(info.value)
    assert isinstance(info.value.__cause__, torch.OutOfMemoryError)


def _failing_logits(adapter, limit: int, seen: list[int]):
    original = adapter.logits

    def logits(images: torch.Tensor) -> torch.Tensor:
        seen.append(images.shape[0])
        if images.shape[0] > limit:
            raise torch.OutOfMemoryError("simulated: out of memory")
        return original(images)

    return logits


def test_lime_recovers_with_the_same_map(monkeypatch):
    adapter = tiny_vit()
    x = images_for(adapter, 2)
    params = dict(n_samples=60, batch_size=32, space="token")
    reference = attribute("lime", adapter, x, [1, 2], **params)
    seen: list[int] = []
    monkeypatch.setattr(adapter, "logits", _failing_logits(adapter, 8, seen))
    recovered = attribute("lime", adapter, x, [1, 2], **params)
    assert seen[:3] == [32, 16, 8] and max(seen[2:]) <= 8  # backed off once, stayed small
    assert torch.equal(recovered.maps, reference.maps)
    assert torch.equal(recovered.native, reference.native)


def test_integrated_gradients_recovers_with_the_same_map(monkeypatch):
    adapter = tiny_vit()
    x = images_for(adapter, 2)
    reference = attribute("integrated_gradients", adapter, x, [1, 2], steps=12,
                          batch_size=24)
    seen: list[int] = []
    monkeypatch.setattr(adapter, "logits", _failing_logits(adapter, 5, seen))
    recovered = attribute("integrated_gradients", adapter, x, [1, 2], steps=12,
                          batch_size=24)
    assert seen[:3] == [24, 12, 6] and max(seen[3:]) <= 5
    # chunks are folded in float32 and summed in float64: equal up to float32 rounding
    torch.testing.assert_close(recovered.maps, reference.maps, rtol=1e-5, atol=1e-9)
    assert not torch.equal(recovered.maps, torch.zeros_like(recovered.maps))


def test_default_batch_size_by_device(monkeypatch):
    from vitxai.batching import default_batch_size

    assert default_batch_size("cpu") == 16 and default_batch_size(torch.device("cuda", 0)) == 64
    adapter = tiny_vit()
    x = images_for(adapter, 1)
    seen: list[int] = []
    monkeypatch.setattr(adapter, "logits", _failing_logits(adapter, 10**6, seen))
    attribute("lime", adapter, x, [1], n_samples=40)  # batch_size None: the CPU default
    assert seen == [16, 16, 8]
    seen.clear()
    attribute("integrated_gradients", adapter, x, [1], steps=20, batch_size=None)
    assert seen == [16, 4]
    with pytest.raises(ValueError, match="batch_size"):
        attribute("lime", adapter, x, [1], batch_size=0)
