"""Do the native exports' own video processors give training's ids and logits? (issue 29) The tiny Qwen2.5-VL,
Qwen3-VL and Gemma 4-shaped models of scripts/check_vllm.py, each exported natively, asked about one video (given
as its frames, 2 a second, each already at the size the video budget gives it, so that no resampling differs) by
vlmtrain and by transformers alone (AutoProcessor with the export's video processor config, and
AutoModelForImageTextToText): the prompt's token ids and log-probabilities are compared. transformers' video
processors need torchvision, which has no build for vlmtrain's torch here: the second step runs in another
environment that has it (docs/video.md).

    python scripts/check_video_processors.py prepare OUT        # vlmtrain's environment: exports and answers
    OTHER_ENV/bin/python scripts/check_video_processors.py process OUT   # transformers with torchvision
    python scripts/check_video_processors.py compare OUT        # a table of the differences
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path
from runpy import run_path

ROOT = Path(__file__).resolve().parents[1]
CHECK_VLLM = ROOT / "scripts" / "check_vllm.py"  # its tiny models and their native exports, and how answers compare
FRAME_COUNTS = (5, 9, 40)  # frames of each video, 2 a second (40: more than the 16 at most that a video trains on)
SIZE = (240, 320)  # (height, width) before the video budget's resize
QUESTION = "What happens?"
SERVED_VIDEO = {  # what stands for a video in each family's prompt, as its processor expects it
    "qwen2_5_vl": "<|vision_start|><|video_pad|><|vision_end|>",
    # Qwen3-VL's chat template writes <|vision_start|><|video_pad|><|vision_end|>, which transformers 5.25's processor
    # collapses into the bare token (each frame has its own bounds) and 5.19's (the one with torchvision here) does not
    "qwen3_vl": "<|video_pad|>",
    "gemma4": "<|video|>",
}


def frame_paths(out: Path, family: str, count: int) -> list[Path]:
    return [out / family / "frames" / f"{count}-{index}.png" for index in range(count)]


def prepare(out: Path) -> None:
    """Each family's native export, the videos' frames, the prompts the processors are given, vlmtrain's answers."""
    import torch
    from PIL import Image

    from vlmtrain.text.chat import generation_prompt

    answers = []
    for family, served in SERVED_VIDEO.items():
        model = run_path(str(CHECK_VLLM))["write_native_export"](family, out / family)
        (out / family / "frames").mkdir(exist_ok=True)
        budget = model.video.budget
        rows, cols = model.geometry.image(*model.geometry.image(*SIZE, budget).resize, budget).resize
        for count in FRAME_COUNTS:
            generator = torch.Generator().manual_seed(count)
            paths = frame_paths(out, family, count)
            for path in paths:
                pixels = torch.randint(0, 256, (rows, cols, 3), generator=generator, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(path)
            frames = [Image.open(path).convert("RGB") for path in paths]
            question = [{"role": "user", "content": f"<video>{QUESTION}"}]
            ids, _ = model.inputs([], messages=question, videos=[frames])
            logits = model.logits([], messages=question, videos=[frames])[0, :-1].float().log_softmax(-1)
            prompt = generation_prompt(model.tokenizer, [{"role": "user", "content": f"{served}{QUESTION}"}])
            answers.append({
                "family": family, "frames": count, "fps": model.video.fps, "prompt": prompt, "prompt_ids": ids[0].tolist(),
                "most": model.video.frames(budget, model.frames.frames),
                "prompt_logprobs": logits.gather(1, ids[0, 1:, None])[:, 0].tolist(),
            })
    (out / "vlmtrain.json").write_text(json.dumps(answers))
    print(f"wrote {len(answers)} answers to {out / 'vlmtrain.json'}")


def process(out: Path) -> None:
    """transformers' answers: each export's own processor (its video processor sampling the frames) and model."""
    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.video_utils import VideoMetadata

    answers = []
    for asked in json.loads((out / "vlmtrain.json").read_text()):
        family, count, fps = asked["family"], asked["frames"], asked["fps"]
        folder = out / family / "export"
        processor = AutoProcessor.from_pretrained(folder)
        model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
        video = np.stack([np.asarray(Image.open(path).convert("RGB")) for path in frame_paths(out, family, count)])
        metadata = VideoMetadata(total_num_frames=count, fps=fps, duration=count / fps)
        # Gemma 4's processor samples by rate unless given a count: a video longer than the most frames it trains on
        # is served with num_frames (README, "Video")
        longer = {"num_frames": asked["most"], "fps": None} if family == "gemma4" and count > asked["most"] else {}
        inputs = processor(text=[asked["prompt"]], videos=[video], video_metadata=[metadata], return_tensors="pt", **longer)
        inputs.pop("video_metadata", None)
        if "num_frames_per_video" in inputs:  # transformers 5.19's Gemma4Model.forward does not pass it on
            frames = inputs["num_frames_per_video"]
            model.model.get_video_features = partial(model.model.get_video_features, num_frames_per_video=frames)
        with torch.no_grad():
            logits = model(**inputs).logits[0, :-1].float().log_softmax(-1)
        ids = inputs["input_ids"]
        logprobs = logits.gather(1, ids[0, 1:, None])[:, 0].tolist()
        answers.append({**asked, "prompt_ids": ids[0].tolist(), "prompt_logprobs": logprobs})
    (out / "transformers.json").write_text(json.dumps(answers))
    print(f"wrote {len(answers)} answers to {out / 'transformers.json'}")


def compare(out: Path) -> None:
    ours, theirs = (json.loads((out / name).read_text()) for name in ("vlmtrain.json", "transformers.json"))
    print("| family | frames (2 a second) | prompt tokens | prompt ids equal | max prompt log-prob gap |")
    print("| --- | ---: | ---: | --- | ---: |")
    agreement = run_path(str(CHECK_VLLM))["prompt_agreement"]
    for mine, served in zip(ours, theirs, strict=True):
        equal, gap = agreement(mine, served)
        print(f"| {mine['family']} | {mine['frames']} | {len(mine['prompt_ids'])} | {equal} | {gap:.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=("prepare", "process", "compare"))
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    {"prepare": prepare, "process": process, "compare": compare}[args.step](args.out)


if __name__ == "__main__":
    main()
