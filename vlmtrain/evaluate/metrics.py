"""What one model scores at one budget: loss and token accuracy over target tokens (teacher forcing), exact
match and word recall of its generations, visual tokens per image and per sample, and images per second, summed as the
evaluation goes (:class:`Tally`) and reported as one :class:`BudgetResult`."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from vlmtrain.modeling.inputs import ImageBatch
from vlmtrain.modeling.vlm import SampleLosses

RECORD = "record"  # the budget of an evaluation that gives each image and frame the budget its record fixes


@dataclass
class BudgetResult:
    """One model at one budget (a level; ``auto[:TOL]``: the model's selector picks per image; :data:`RECORD`:
    each image and frame at the budget its record fixes, the others at the model's defaults)."""

    budget: int | str
    samples: int
    images: int
    loss: float
    token_accuracy: float
    exact_match: float | None
    word_recall: float | None
    visual_tokens_per_image: float  # per image, or per video frame (Qwen-VL: per pair of frames)
    visual_tokens_per_sample: float  # all of a sample's images and videos: a one-video sample's, per video
    images_per_s: float
    latency_ms: float  # median
    latency_p10_ms: float
    latency_p90_ms: float
    chosen: dict[str, int] | None = None  # auto: how many images the selector put at each level


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def word_recall(target: str, generated: str) -> float:
    """Share of the target's words that the generation contains (1.0 for an empty target)."""
    expected = words(target)
    found = set(words(generated))
    return sum(word in found for word in expected) / len(expected) if expected else 1.0


@dataclass
class Tally:
    """Sums over the batches and answers of one model at one budget."""

    loss_sum: float = 0.0
    tokens: int = 0
    correct: int = 0
    samples: int = 0
    images: int = 0
    visual: int = 0
    seconds: float = 0.0
    exact: list[bool] = field(default_factory=list)
    recall: list[float] = field(default_factory=list)

    def add_batch(self, losses: SampleLosses, images: ImageBatch, seconds: float) -> None:
        """A batch's losses and images, and the seconds its forward pass took."""
        self.loss_sum += float(losses.loss_sum.sum())
        self.correct += int(losses.correct.sum())
        self.tokens += int(losses.tokens.sum())
        self.samples += int(losses.tokens.shape[0])
        self.images += images.count
        self.visual += int(images.token_counts.sum())
        self.seconds += seconds

    def add_answer(self, target: str, generated: str) -> None:
        self.exact.append(generated.strip() == target.strip())
        self.recall.append(word_recall(target, generated))

    def result(self, budget: int | str, latency_ms: tuple[float, float, float], chosen: dict[str, int] | None) -> BudgetResult:
        """The scores, with the latency's (median, p10, p90) and, for auto, the levels chosen."""
        median, p10, p90 = latency_ms
        return BudgetResult(
            budget=budget,
            samples=self.samples,
            images=self.images,
            loss=self.loss_sum / max(self.tokens, 1),
            token_accuracy=self.correct / max(self.tokens, 1),
            exact_match=sum(self.exact) / len(self.exact) if self.exact else None,
            word_recall=sum(self.recall) / len(self.recall) if self.recall else None,
            visual_tokens_per_image=self.visual / max(self.images, 1),
            visual_tokens_per_sample=self.visual / max(self.samples, 1),
            images_per_s=self.images / self.seconds if self.seconds else 0.0,
            latency_ms=median,
            latency_p10_ms=p10,
            latency_p90_ms=p90,
            chosen=chosen,
        )
