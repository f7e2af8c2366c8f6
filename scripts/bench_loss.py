"""Peak memory and time of the LM loss, whole logits against chunked (model.lm.loss_chunk_tokens), at Gemma 4's
vocabulary: one forward and backward pass of the head and the cross-entropy over N labelled tokens, each
variant in a process of its own (peak RSS above what the process held before the loss), in one run.

    python scripts/bench_loss.py                       # vocab 262,144, hidden 512, 2,048 tokens, chunk 256
    python scripts/bench_loss.py --tokens 4096 --chunk 512
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def measure(variant: str, vocab: int, hidden: int, tokens: int, chunk: int) -> dict[str, float]:
    """Run one variant here; what it costs."""
    import torch
    import torch.nn.functional as F

    from vlmtrain.modeling.loss import chunked_token_losses

    torch.manual_seed(0)
    head = torch.nn.Linear(hidden, vocab, bias=False)
    states = torch.randn(tokens, hidden, requires_grad=True)
    labels = torch.randint(0, vocab, (tokens,))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    began = time.perf_counter()
    if variant == "whole":
        loss = F.cross_entropy(head(states).float(), labels, reduction="none").sum()
    else:
        loss = chunked_token_losses(states, labels, head, None, chunk)[0].sum()
    loss.backward()
    seconds = time.perf_counter() - began
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"peak_mib": (peak - before) / 1024, "seconds": seconds, "loss": float(loss), "grad": float(states.grad.norm())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=262_144)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # set in the child processes
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args.variant, args.vocab, args.hidden, args.tokens, args.chunk)))
        return
    shape = ["--vocab", str(args.vocab), "--hidden", str(args.hidden), "--tokens", str(args.tokens), "--chunk", str(args.chunk)]
    results = {}
    for variant in ("whole", "chunked"):
        out = subprocess.run([sys.executable, __file__, *shape, "--variant", variant], capture_output=True, text=True, check=True)
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    whole, chunked = results["whole"], results["chunked"]
    logits_mib = args.tokens * args.vocab * 4 / 2**20
    print(f"vocab {args.vocab:,}, hidden {args.hidden}, {args.tokens:,} labelled tokens (fp32 logits: {logits_mib:,.0f} MiB), "
          f"chunk {args.chunk:,}")
    print(f"{'loss':<10}{'peak MiB':>10}{'seconds':>10}")
    for name, result in results.items():
        print(f"{name:<10}{result['peak_mib']:>10,.0f}{result['seconds']:>10.2f}")
    ratios = f"peak {chunked['peak_mib'] / whole['peak_mib']:.2f}x, time {chunked['seconds'] / whole['seconds']:.2f}x"
    print(f"chunked / whole: {ratios}; "
          f"same loss: {abs(chunked['loss'] - whole['loss']) <= 1e-5 * abs(whole['loss'])}, "
          f"same gradient norm: {abs(chunked['grad'] - whole['grad']) <= 1e-5 * whole['grad']}")


if __name__ == "__main__":
    main()
