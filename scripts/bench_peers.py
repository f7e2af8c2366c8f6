"""vlmtrain against a peer trainer, side by side in one run (issue 30): the same tiny Qwen2.5-VL (random weights,
scripts/tiny_qwen.py) trained on the same caption / QA / multi-turn mix (scripts/bench_packing.py's: a tenth
text-only, a tenth with two images) by vlmtrain (packed steps under a 4,096-token cap) and by TRL's SFTTrainer
(its vision collator: Qwen's own processor and padding, as LLaMA-Factory and TRL users train) with the image
processor's max_pixels at the same budget (budget x 28 x 28) and the same number of samples per step.

    pip install trl        # the peer (not a vlmtrain dependency)
    python scripts/bench_peers.py [--steps 6] [--budgets 70,280,1120] [--out /tmp/vlmtrain-bench-peers]

Each trainer and budget runs in a fresh process, one warm-up step first, data prepared outside the timed steps
(vlmtrain's steps are built before timing; the Trainer fetches and collates a batch before its step begins).
Prints, per budget: real (non-padding) LM tokens per second and the peak memory (resident set) of each, and
their ratios. Both compute the loss on every text token here (TRL's assistant-only loss needs template
markers); what differs is how the steps are laid out.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_packing import MIX_TEXT, build_mix, measure  # noqa: E402 (a script beside this one)

# Qwen's chat layout for both trainers: a content part list (TRL) or a string with <|image_pad|> markers (vlmtrain,
# which writes each marker as Qwen's processor does: <|vision_start|> placeholders <|vision_end|>)
TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def prepare(out: Path, samples: int) -> tuple[str, Path]:
    """The mix's shards (once) and the tiny Qwen2.5-VL with the template; (shard spec, the model's folder)."""
    from runpy import run_path

    spec = build_mix(out / "mix", samples)
    qwen = out / "qwen"
    if not (qwen / "checkpoint" / "config.json").is_file():
        run_path(str(ROOT / "scripts" / "tiny_qwen.py"))["write_tiny_qwen"](qwen)
    (qwen / "template.jinja").write_text(TEMPLATE)
    return spec, qwen


def vlmtrain_overrides(qwen: Path) -> list[str]:
    """The bench recipe reading the whole tiny checkpoint, conversations through the template."""
    return [
        "model.vision.backbone=qwen2_5_vl", f"model.vision.path={qwen / 'checkpoint'}", "model.vision.patch_size=null",
        "model.pooling.kind=tower", "model.pooling.size=null", "model.projector.kind=identity",
        f"model.lm.path={qwen / 'checkpoint'}", "model.lm.hf_config=null", f"model.lm.tokenizer={qwen / 'tokenizer'}",
        "model.lm.image_token=<|image_pad|>", f"data.text.chat_template={qwen / 'template.jinja'}",
    ]


def trl_examples(mix: Path) -> list[dict]:
    """The mix's records as TRL's conversational examples: images, and messages of content parts."""
    from PIL import Image

    examples = []
    for line in (mix / "mix.jsonl").read_text().splitlines():
        record = json.loads(line)
        images = [Image.open(mix / "images" / name).convert("RGB") for name in record["images"]]
        if "messages" in record:
            turns = [(turn["role"], turn["content"]) for turn in record["messages"]]
        else:
            turns = [("user", record["prompt"]), ("assistant", record["text"])]
        messages = []
        for role, text in turns:
            pieces = text.split("<image>")
            parts = [{"type": "image"} for _ in pieces[1:]] + ([{"type": "text", "text": pieces[-1]}] if pieces[-1] else [])
            messages.append({"role": role, "content": parts})
        examples.append({"images": images, "messages": messages})
    return examples


def measure_trl(out: Path, qwen: Path, budget: int, batch: int, steps: int) -> dict:
    """TRL's SFTTrainer on the mix at max_pixels = budget x 28 x 28, ``batch`` samples a step."""
    from unittest import mock

    import torch
    from datasets import Dataset
    from transformers import (
        AutoTokenizer,
        ProcessorMixin,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        TrainerCallback,
    )
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(qwen / "tokenizer")
    tokenizer.chat_template = TEMPLATE
    images = Qwen2VLImageProcessorPil(size={"shortest_edge": 3136, "longest_edge": budget * 28 * 28})
    with mock.patch.object(ProcessorMixin, "check_argument_for_proper_class", lambda self, name, argument: None):
        processor = Qwen2_5_VLProcessor(image_processor=images, tokenizer=tokenizer, video_processor=None, chat_template=TEMPLATE)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(qwen / "checkpoint")
    config = SFTConfig(
        output_dir=str(out / "trl-run"), max_steps=steps + 1, per_device_train_batch_size=batch, learning_rate=1e-4,
        logging_steps=10**6, save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0, max_length=None,
        seed=0, data_seed=0, gradient_checkpointing=False,  # TRL's default is on; vlmtrain's steps here recompute nothing
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(trl_examples(out / "mix")),
                         processing_class=processor)
    collate, real_tokens, positions = trainer.data_collator, [], []

    def counting(examples: list[dict]) -> dict:
        collated = collate(examples)
        real_tokens.append(int(collated["attention_mask"].sum()))
        positions.append(collated["attention_mask"].numel())
        return collated

    trainer.data_collator = counting
    seconds: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.began = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            seconds.append(time.perf_counter() - self.began)

    trainer.add_callback(Timer())
    trainer.train()
    tokens = sum(real_tokens[1 : steps + 1])
    return {
        "tokens_per_s": tokens / sum(seconds[1 : steps + 1]),
        "lm_padding": 1 - tokens / sum(positions[1 : steps + 1]),
        "peak_memory_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def child(arguments: list[str]) -> dict:
    """Run this script on one configuration in a fresh process; its figures."""
    result = subprocess.run([sys.executable, __file__, *arguments], capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{' '.join(arguments)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--samples", type=int, default=600)
    parser.add_argument("--budgets", default="70,280,1120")
    parser.add_argument("--out", type=Path, default=Path("/tmp/vlmtrain-bench-peers"))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: [trainer, budget, batch] in this process
    args = parser.parse_args()
    spec, qwen = prepare(args.out, args.samples)
    if args.one:
        trainer, budget, batch = json.loads(args.one)
        if trainer == "vlmtrain":
            figures = measure(spec, [*vlmtrain_overrides(qwen), *MIX_TEXT], [budget], args.steps, True)
        else:
            figures = measure_trl(args.out, qwen, budget, batch, args.steps)
        print(json.dumps(figures))
        return
    import trl

    common = ["--steps", str(args.steps), "--samples", str(args.samples), "--out", str(args.out)]
    print(f"{args.samples} samples (captions, QA, multi-turn; 10% text-only, 10% two images); {args.steps} timed steps; "
          f"TRL {trl.__version__}")
    print("| budget | samples/step | real tokens/s vlmtrain / TRL | ratio | LM padding vlmtrain / TRL | peak GB vlmtrain / TRL |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for budget in map(int, args.budgets.split(",")):
        ours = child([*common, "--one", json.dumps(["vlmtrain", budget, 0])])
        batch = max(1, round(ours["samples_per_step"]))
        theirs = child([*common, "--one", json.dumps(["trl", budget, batch])])
        print(f"| {budget} | {batch} | {ours['tokens_per_s']:,.0f} / {theirs['tokens_per_s']:,.0f} | "
              f"{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x | {ours['lm_padding']:.1%} / {theirs['lm_padding']:.1%} | "
              f"{ours['peak_memory_gb']:.2f} / {theirs['peak_memory_gb']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
