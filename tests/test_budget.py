"""The budget schedule: a pure function of (seed, step), with the recipe's weights."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

import pytest

from vlmtrain.budget import BudgetSchedule
from vlmtrain.modeling.geometry import LEVELS

UNIFORM = (1.0,) * 5


def draws(schedule: BudgetSchedule, steps: range) -> list[int]:
    return [schedule.sample(step) for step in steps]


def test_same_seed_and_step_give_the_same_budget_in_any_order():
    schedule = BudgetSchedule(LEVELS, UNIFORM, seed=7)
    forward = draws(schedule, range(500))
    backward = [schedule.sample(step) for step in reversed(range(500))][::-1]
    assert forward == backward == draws(BudgetSchedule(LEVELS, UNIFORM, seed=7), range(500))


def test_a_resumed_run_continues_the_schedule():
    schedule = BudgetSchedule(LEVELS, UNIFORM, seed=3)
    assert draws(schedule, range(1000))[600:] == draws(BudgetSchedule(LEVELS, UNIFORM, seed=3), range(600, 1000))


def test_other_processes_with_other_hash_seeds_agree():
    code = (
        "from vlmtrain.budget import BudgetSchedule; "
        "print([BudgetSchedule((70,140,280,560,1120),(1,)*5,seed=11).sample(s) for s in range(200)])"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, env={**os.environ, "PYTHONHASHSEED": seed}
        ).stdout
        for seed in ("0", "1", "12345")
    }
    assert len(outputs) == 1
    assert eval(outputs.pop()) == draws(BudgetSchedule(LEVELS, UNIFORM, seed=11), range(200))


def test_seeds_give_different_schedules():
    assert draws(BudgetSchedule(LEVELS, UNIFORM, seed=0), range(200)) != draws(
        BudgetSchedule(LEVELS, UNIFORM, seed=1), range(200)
    )


def test_frequencies_follow_the_weights():
    weights = (4.0, 3.0, 2.0, 1.0, 0.0)
    counts = Counter(draws(BudgetSchedule(LEVELS, weights, seed=5), range(50000)))
    assert counts[1120] == 0
    for level, weight in zip(LEVELS[:4], weights[:4], strict=True):
        assert abs(counts[level] / 50000 - weight / 10) < 0.01, (level, counts)


def test_matryoshka_trains_every_level_at_every_step():
    schedule = BudgetSchedule((70, 280, 1120), (1.0, 1.0, 1.0), seed=0, mode="matryoshka")
    assert {schedule.budgets(step) for step in range(100)} == {(70, 280, 1120)}


@pytest.mark.parametrize(
    "levels, weights, mode",
    [
        ((70, 100), (1.0, 1.0), "sample"),
        ((70, 140), (1.0,), "sample"),
        ((70, 140), (0.0, 0.0), "sample"),
        ((70,), (1.0,), "random"),
    ],
)
def test_invalid_schedules_are_refused(levels, weights, mode):
    with pytest.raises(ValueError):
        BudgetSchedule(levels, weights, seed=0, mode=mode)


def test_independent_image_budgets_are_pure_and_follow_the_weights():
    schedule = BudgetSchedule(LEVELS, (4.0, 1.0, 1.0, 1.0, 1.0), seed=5, per_image="independent")
    assert schedule.budgets(3) == (None,)
    draws = [schedule.image_budget(step, f"key{step % 7}", index) for step in range(2000) for index in range(2)]
    counts = Counter(draws)
    assert abs(counts[70] / len(draws) - 0.5) < 0.03 and all(abs(counts[b] / len(draws) - 0.125) < 0.02 for b in LEVELS[1:])
    again = BudgetSchedule(LEVELS, (4.0, 1.0, 1.0, 1.0, 1.0), seed=5, per_image="independent")
    assert draws == [again.image_budget(step, f"key{step % 7}", index) for step in range(2000) for index in range(2)]
    pairs = [
        (schedule.image_budget(9, "a", 0), schedule.image_budget(9, "a", 1), schedule.image_budget(9, "b", 0)) for _ in range(3)
    ]
    assert len(set(pairs)) == 1
    assert len({schedule.image_budget(9, key, index) for key in "abcdefgh" for index in range(3)}) > 1  # key and index matter
    assert schedule.image_budgets(9, "a", None, [1120, None]) == (1120, schedule.image_budget(9, "a", 1))  # a fixed budget wins
    assert schedule.image_budgets(9, "a", 140, [None, 70]) == (140, 70)


def test_the_images_of_one_sample_are_drawn_independently():
    # two images of a sample differ as often as two independent draws do: 1 - sum(w^2) of the time
    weights = (4.0, 1.0, 1.0, 1.0, 1.0)
    schedule = BudgetSchedule(LEVELS, weights, seed=11, per_image="independent")
    draws = [schedule.image_budgets(step, f"sample-{step * 7 % 31}", None, [None] * 3) for step in range(900)]
    expected = 1 - sum((w / sum(weights)) ** 2 for w in weights)  # 0.6875
    for first, second in ((0, 1), (0, 2), (1, 2)):
        differ = sum(d[first] != d[second] for d in draws) / len(draws)
        assert abs(differ - expected) < 0.05, (first, second, differ)


def test_independent_budgets_are_the_same_in_another_process():
    code = (
        "from vlmtrain.budget import BudgetSchedule; s = BudgetSchedule.uniform(seed=2, per_image='independent'); "
        "print([s.image_budget(t, 'sample-' + str(t), t % 3) for t in range(100)])"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": seed}
        ).stdout
        for seed in ("1", "2")
    }
    local = BudgetSchedule.uniform(seed=2, per_image="independent")
    assert outputs == {str([local.image_budget(t, "sample-" + str(t), t % 3) for t in range(100)]) + "\n"}


def test_independent_budgets_need_sample_mode():
    with pytest.raises(ValueError, match="per_image: independent budgets per image need budget.mode: sample"):
        BudgetSchedule(LEVELS, UNIFORM, seed=0, mode="matryoshka", per_image="independent")
