"""``trainer.compile`` on vlmtrain's packed steps, measured (issue 30): the demo recipe's model built twice, eager
and with its LM layers compiled (``vlmtrain/train/compile.py``: dynamic shapes, the packed attention eager), the
same packed steps through both in one process, alternating (forward and backward, dropout off so that the losses
compare); prints each step's length and times, the first compiled step (compiling), the median of the rest,
whether the losses agree, and dynamo's counters (graphs, graph breaks, recompilations).

    python scripts/bench_compile.py [--steps 50] [--data data/generated/demo]   # after scripts/demo.sh

With the attention traced too (the first attempt, at fcda951) every step recompiled on the tests' small recipe and
on ``recipes/tiny.yaml`` the first compiled step ended the process in an inductor CPU kernel ("index out of
bounds"); hence the attention runs eager inside the compiled layers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from itertools import islice
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "generated" / "demo")
    args = parser.parse_args()

    from torch._dynamo.utils import counters

    from vlmtrain.config import load_recipe
    from vlmtrain.plan import plan_run
    from vlmtrain.train.module import VLMModule
    from vlmtrain.train.run import build_datamodule

    shards = sorted(args.data.glob("train-*.tar"))
    common = [f"data.train={args.data}/train-{{000000..{len(shards) - 1:06d}}}.tar", "data.val=null", "logger=none",
              "run_dir=/tmp/vlmtrain-bench-compile"]
    modules = []
    for compiled in (False, True):
        module = VLMModule(plan_run(load_recipe(ROOT / "recipes" / "tiny.yaml", [*common, f"trainer.compile={compiled}"])))
        module.configure_model()
        modules.append(module.model.eval())
    stream = build_datamodule(module.plan).train_dataloader().dataset
    batches = [step.batches[0] for step in islice(stream.steps(0, 1, 0), args.steps)]

    def step(model, inputs) -> tuple[float, float]:
        began = time.perf_counter()
        loss = model.sample_losses(inputs).mean()
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.item(), time.perf_counter() - began

    counters.clear()
    rows = []
    for index, batch in enumerate(batches):
        (eager_loss, eager_time), (compiled_loss, compiled_time) = (step(model, batch.inputs) for model in modules)
        rows.append((eager_loss, eager_time, compiled_loss, compiled_time))
        print(f"step {index}: {tuple(batch.inputs.input_ids.shape)} eager {eager_time:.3f} s, compiled {compiled_time:.3f} s",
              flush=True)
    eager = statistics.median(row[1] for row in rows[1:])
    compiled = statistics.median(row[3] for row in rows[1:])
    agree = max(abs(row[0] - row[2]) for row in rows)
    print(f"first compiled step (compiling) {rows[0][3]:.1f} s; median of steps 1-{len(rows) - 1}: eager {eager:.3f} s, "
          f"compiled {compiled:.3f} s, compiled/eager {compiled / eager:.2f}x; largest loss difference {agree:.1e}")
    print(f"graphs {counters['stats']['unique_graphs']}, graph breaks {sum(counters['graph_break'].values())}, "
          f"recompilations {sum(counters['recompiles'].values())}")


if __name__ == "__main__":
    main()
