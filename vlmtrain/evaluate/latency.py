"""Latency per question: a question's prompt alone (its images included) through encoder and LM, one at a
time, timed on a clock that waits for the device, after an untimed warm-up at each budget."""

from __future__ import annotations

import time

import torch

from vlmtrain.inference import ExportedModel, Prompt
from vlmtrain.modeling.inputs import ImageBatch


def clock(device: torch.device) -> float:
    """Seconds, once the device's queued work is done (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def percentile(values: list[float], share: float) -> float:
    """The ``share`` quantile of ``values`` (linear interpolation)."""
    return float(torch.quantile(torch.tensor(values, dtype=torch.float64), share))


class LatencyProbe:
    """Times each question's prefill (:meth:`ExportedModel.prefill`) and keeps the seconds."""

    def __init__(self, model: ExportedModel) -> None:
        self.model = model
        self.seconds: list[float] = []

    def warm_up(self, prompt: torch.Tensor, images: ImageBatch) -> None:
        """One untimed prefill (kernels, allocator, caches)."""
        self.model.prefill(prompt, images)

    def measure(self, prompt: torch.Tensor, images: ImageBatch, extra: float = 0.0) -> Prompt:
        """Prefill ``prompt`` with ``images`` and keep its time (plus ``extra`` seconds spent on the question
        elsewhere, e.g. choosing its budgets); returns the prompt as the LM took it, to generate from."""
        began = clock(self.model.device)
        prefilled = self.model.prefill(prompt, images)
        self.seconds.append(clock(self.model.device) - began + extra)
        return prefilled

    def milliseconds(self) -> tuple[float, float, float]:
        """(median, 10th, 90th percentile) in milliseconds."""
        return tuple(1000 * percentile(self.seconds, share) for share in (0.5, 0.1, 0.9))
