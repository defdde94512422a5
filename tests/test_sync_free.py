"""No host-device synchronisation inside the micro-step loop, and the documented number
per optimizer step (docs/metrics.md).

CPU: every Python-level way to read a tensor's value on the host (``item``,
``tolist``, ``bool``/``int``/``float``/``index`` conversions, ``numpy``) is patched to
count its calls. Inside micro-steps every call counts (from tfx, torch or anywhere),
and there must be none. In the rest of the optimizer step only tfx's own reads count:
torch's optimizers read their step counters, which live on the CPU even in CUDA runs.
CUDA: ``torch.cuda.set_sync_debug_mode("error")`` makes any synchronising call inside
a micro-step raise; the optimizer step's are counted with ``"warn"``.
"""
from __future__ import annotations

import collections
import sys
import warnings
from pathlib import Path

import pytest
import torch

from conftest import tiny
from tfx.train.run import build

TFX = str(Path(__file__).resolve().parents[1] / "tfx")
READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy")


class ReadCounter:
    """Counts host reads of tensors per phase: ``micro`` (all callers) and ``step``
    (callers in tfx, keyed by file)."""

    def __init__(self, monkeypatch):
        self.phase = None
        self.micro = []
        self.step = collections.Counter()
        for name in READS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counting(name, original))

    def _counting(self, name, original):
        def read(tensor, *args, **kwargs):
            if self.phase is not None:
                caller = sys._getframe(1).f_code.co_filename
                if self.phase == "micro":
                    self.micro.append((name, caller))
                elif caller.startswith(TFX):
                    self.step[(name, Path(caller).name)] += 1
            return original(tensor, *args, **kwargs)
        return read

    def wrap(self, trainer, monkeypatch):
        def phased(phase, fn):
            def run(*args, **kwargs):
                outer, self.phase = self.phase, phase
                try:
                    return fn(*args, **kwargs)
                finally:
                    self.phase = outer
            return run
        monkeypatch.setattr(trainer, "_micro_step", phased("micro", trainer._micro_step))
        monkeypatch.setattr(trainer, "_optimizer_step", phased("step", trainer._optimizer_step))


@pytest.mark.parametrize("overrides,reads", [
    ((), {("tolist", "trainer.py"): 1}),
    (("trainer.grad_clip=null",), {("item", "trainer.py"): 1}),
    (("trainer.accum_steps=3", "precision=bf16", "memory=activation_ckpt"),
     {("tolist", "trainer.py"): 1}),
])
def test_no_host_reads_inside_micro_steps(overrides, reads, tmp_path, pydocs_data, monkeypatch):
    """``reads`` per optimizer step: the loop's one read (the loss, together with the
    clipping norm when there is one)."""
    steps = 2
    job = build(tiny(*overrides, f"trainer.max_steps={steps}"), tmp_path, data=pydocs_data)
    counter = ReadCounter(monkeypatch)
    counter.wrap(job.trainer, monkeypatch)
    for _ in range(steps):
        job.trainer.train_step()
    assert counter.micro == []
    assert counter.step == {k: v * steps for k, v in reads.items()}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("overrides", [(), ("trainer.accum_steps=2", "precision=bf16")])
def test_cuda_micro_steps_never_synchronise(overrides, tmp_path, pydocs_data, monkeypatch):
    job = build(tiny("trainer.device=cuda", *overrides), tmp_path, data=pydocs_data)
    trainer = job.trainer
    trainer.train_step()  # warm-up: allocator, cuBLAS handles, lazy inits
    torch.cuda.synchronize()
    micro, step = trainer._micro_step, trainer._optimizer_step

    def strict_micro(*args, **kwargs):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return micro(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    syncs = []

    def counted_step(*args, **kwargs):
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                return step(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            syncs.append(sum("synchronizing" in str(w.message) for w in caught))

    monkeypatch.setattr(trainer, "_micro_step", strict_micro)
    monkeypatch.setattr(trainer, "_optimizer_step", counted_step)
    for _ in range(2):
        trainer.train_step()
    # the loop's one read of the loss and the clipping norm together (grad_clip=1.0)
    assert syncs == [1, 1], syncs
