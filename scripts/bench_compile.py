"""torch.compile on vlmtrain's packed steps, measured (issue 30): the demo model's LM decoder layers compiled in
place (``nn.Module.compile(dynamic=True)``), the same packed steps run eager and compiled in one process; prints each
step's time and shape, whether the losses agree, and dynamo's counters (graphs, graph breaks, recompilations).

    python scripts/bench_compile.py [--steps 12] [--data data/generated/demo]   # after scripts/demo.sh

Findings at fcda951 (2 CPU cores, torch 2.13): on the tests' small recipe the losses agree but every step
recompiles, since the packed attention's CPU path groups sequences by their lengths (``modeling/attention.py``),
a data-dependent value that breaks the graph, and after dynamo's recompile limit (8) the layers run eager again;
on ``recipes/tiny.yaml`` the first compiled step (34 s of compiling) ends the process in an inductor CPU kernel
("index out of bounds"). Compiling pays only with a compile-friendly attention; vlmtrain does not offer it yet.
"""

from __future__ import annotations

import argparse
import sys
import time
from itertools import islice
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "generated" / "demo")
    args = parser.parse_args()

    from torch._dynamo.utils import counters

    from vlmtrain.config import load_recipe
    from vlmtrain.plan import plan_run
    from vlmtrain.train.module import VLMModule
    from vlmtrain.train.run import build_datamodule

    shards = sorted(args.data.glob("train-*.tar"))
    recipe = load_recipe(ROOT / "recipes" / "tiny.yaml", [
        f"data.train={args.data}/train-{{000000..{len(shards) - 1:06d}}}.tar", "data.val=null", "logger=none",
        "run_dir=/tmp/vlmtrain-bench-compile",
    ])
    module = VLMModule(plan_run(recipe))
    module.configure_model()
    model = module.model
    stream = build_datamodule(module.plan).train_dataloader().dataset
    batches = [step.batches[0] for step in islice(stream.steps(0, 1, 0), args.steps)]

    def run(label: str) -> list[float]:
        losses = []
        for index, batch in enumerate(batches):
            began = time.perf_counter()
            loss = model.sample_losses(batch.inputs).mean()
            loss.backward()
            model.zero_grad(set_to_none=True)
            losses.append(loss.item())
            print(f"{label} step {index}: {tuple(batch.inputs.input_ids.shape)} {time.perf_counter() - began:.2f} s", flush=True)
        return losses

    eager = run("eager")
    lm = model.lm.get_base_model() if hasattr(model.lm, "get_base_model") else model.lm
    for layer in lm.get_decoder().layers:
        layer.compile(dynamic=True)
    compiled = run("compiled")
    agree = all(abs(a - b) < 1e-4 for a, b in zip(eager, compiled, strict=True))
    print(f"losses agree: {agree}; graphs: {counters['stats']['unique_graphs']}; "
          f"graph breaks: {sum(counters['graph_break'].values())}; recompilations: {sum(counters['recompiles'].values())}")


if __name__ == "__main__":
    main()
