"""Training the selector on budget labels: full-batch regression of each level's loss gap, a held-out share
of the samples (by key) reported, never trained on."""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F

from vlmtrain.errors import UserError
from vlmtrain.selector.labels import BudgetLabels
from vlmtrain.selector.model import BudgetSelector


def held_out(key: str, share: float) -> bool:
    """Whether sample ``key`` is held out: a pure function of the key, the same on every machine and run."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < share


def train_selector(
    labels: BudgetLabels, steps: int = 400, lr: float = 3e-3, hidden: int = 64, held_out_share: float = 0.2, seed: int = 0
) -> tuple[BudgetSelector, dict[str, float]]:
    """A selector fitted to ``labels``' gaps; with its mean squared error on trained and held-out images."""
    test = torch.tensor([held_out(key, held_out_share) for key in labels.keys])
    if bool(test.all()):
        raise UserError(f"all {len(labels.keys)} labelled images are held out; label more samples")
    gaps = labels.gaps()
    torch.manual_seed(seed)
    selector = BudgetSelector(labels.features.shape[1], labels.levels, hidden)
    optimizer = torch.optim.AdamW(selector.parameters(), lr=lr, weight_decay=1e-4)
    for _ in range(steps):
        loss = F.mse_loss(selector(labels.features[~test]), gaps[~test])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    selector.eval()
    report = {}
    with torch.no_grad():
        for name, rows in (("train", ~test), ("held_out", test)):
            if bool(rows.any()):
                report[f"{name}_mse"] = float(F.mse_loss(selector(labels.features[rows]), gaps[rows]))
                report[f"{name}_images"] = int(rows.sum())
    return selector, report
