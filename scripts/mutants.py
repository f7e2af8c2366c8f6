"""A mutation check: one small, realistic bug at a time in a scratch copy of the repository, the tests that
should catch it run there, and each mutant printed as caught or MISSED. A missed mutant is either equivalent
to the real code (say why) or a missing test (write it). Run it when a feature is added or changed:

    python scripts/mutants.py            # every mutant (a few minutes on 2 cores)
    python scripts/mutants.py selector   # those whose name contains "selector"
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    old: str  # must occur exactly once in the file
    new: str
    tests: tuple[str, ...]  # pytest arguments: the tests that should catch it


MUTANTS = [
    Mutant("selector: the most expensive level within the tolerance", "vlmtrain/selector/model.py",
           "within[0] if within", "within[-1] if within", ("tests/test_selector.py", "-k", "cheapest")),
    Mutant("selector: the worst level when none is within", "vlmtrain/selector/model.py",
           "self.levels[min(range(len(row))", "self.levels[max(range(len(row))", ("tests/test_selector.py", "-k", "cheapest")),
    Mutant("recipe: batch_tokens must exceed one sample", "vlmtrain/config.py",
           "data.batching.batch_tokens >= one_sample", "data.batching.batch_tokens > one_sample",
           ("tests/test_config.py", "-k", "exactly_one_sample")),
    Mutant("data: a read sample hides the broken images after it", "vlmtrain/data/pipeline.py",
           "        self.unreadable = 0\n", "        self.unreadable = 0\n        self.undecodable = 0\n",
           ("tests/test_data.py", "-k", "never_decode")),
    Mutant("annotations: the system column dropped", "vlmtrain/text/conversation.py",
           'system = record.get("system")', "system = None", ("tests/test_annotations.py", "-k", "system_column")),
    Mutant("annotations: an <audio> marker trained as a word", "vlmtrain/text/conversation.py",
           'UNTRAINED_MARKERS = ("<audio>",)', "UNTRAINED_MARKERS = ()",
           ("tests/test_annotations.py", "-k", "malformed")),
    Mutant("annotations: a repeated id takes a key already used", "vlmtrain/data/annotations.py",
           'key = f"{key}_{number}"', 'key = f"{key}_{number - 1}"', ("tests/test_annotations.py", "-k", "repeating")),
    Mutant("deepspeed: 'auto' overrides the recipe's value", "vlmtrain/train/deepspeed_config.py",
           'if value == "auto":', 'if value == "AUTO":', ("tests/test_config.py", "-k", "deepspeed_json")),
    Mutant("schedule: the cosine decays to 0, not to min_lr_ratio", "vlmtrain/train/optim.py",
           "min_lr_rate=optim.min_lr_ratio", "min_lr_rate=0.0", ("tests/test_train.py", "-k", "warms_up")),
    Mutant("export: a key missing from vision/config.json filled in silently", "vlmtrain/export/format.py",
           "difference is not None and difference[1] is None", "difference is not None and difference[2] is None",
           ("tests/test_export.py", "-k", "missing_a_key")),
    Mutant("export: no word on why a Gemma 4 tower is not native", "vlmtrain/export/write.py",
           "if family is not ASSEMBLED:", "if family is ASSEMBLED:", ("tests/test_export.py", "-k", "another_projector")),
    Mutant("schedule: every image of a sample takes the same draw", "vlmtrain/budget.py",
           "text_id(key), index, 0x1A6E", "text_id(key), 0, 0x1A6E",
           ("tests/test_budget.py", "-k", "independently")),
    Mutant("chat: the template's text before an assistant turn's content labelled", "vlmtrain/text/chat.py",
           "Segment(full[done : len(before) + at], False), Segment(span[at:labelled_end], True)",
           "Segment(full[done : len(before)], False), Segment(span[:labelled_end], True)",
           ("tests/test_chat.py", "-k", "exactly_the_assistant")),
    Mutant("gemma4 export: Gemma4Config's default image token ids", "vlmtrain/families/gemma4.py",
           '        image_token_id=ids["image_token"],\n', "",
           ("tests/test_export.py", "-k", "native_gemma4_processor", "-m", "slow")),
    Mutant("gemma4 export: the processor's default budget is not the model's", "vlmtrain/families/gemma4.py",
           '"image_seq_length": budget,', '"image_seq_length": 280,',
           ("tests/test_export.py", "-k", "native_gemma4_processor", "-m", "slow")),
    Mutant("tables: an image column's bytes ignored for its path", "vlmtrain/text/conversation.py",
           "if isinstance(data, bytes) and data:", "if False:", ("tests/test_tables.py", "-k", "byte_for_byte")),
    Mutant("tables: nulls kept as keys", "vlmtrain/data/record_files.py",
           "{name: value for name, value in row.items() if value is not None}", "dict(row)",
           ("tests/test_tables.py",)),
    Mutant("columns: a ShareGPT messages column read as role/content turns", "vlmtrain/data/annotations.py",
           '            ours = "conversations"\n', "            pass\n", ("tests/test_tables.py", "-k", "columns")),
    Mutant("preflight: the token cap not checked", "vlmtrain/train/preflight.py",
           "    if totals and min(totals) > cap:", "    if totals and min(totals) > 10 * cap:",
           ("tests/test_errors.py", "-k", "token_cap")),
    Mutant("export: another export's weights of the same shapes accepted", "vlmtrain/export/format.py",
           "if weights_fingerprint(path) != expected:", "if weights_fingerprint(path) is None:",
           ("tests/test_export.py", "-k", "damaged")),
    Mutant("export: fingerprints read one end of each tensor only", "vlmtrain/export/format.py",
           "[tensor[:1], tensor[-1:]]", "[tensor[-1:]]", ("tests/test_export.py", "-k", "damaged")),
    Mutant("overwrite: the earlier metrics kept", "vlmtrain/train/layout.py",
           'RUN_OUTPUTS = (CHECKPOINTS, METRICS, "wandb",', 'RUN_OUTPUTS = (CHECKPOINTS, "wandb",',
           ("tests/test_train.py", "-k", "overwrite")),
    Mutant("fresh start: the earlier W&B run continued", "vlmtrain/train/run.py",
           "    if recipe.resume is None:\n        (run_dir / WANDB_RUN_ID).unlink(missing_ok=True)\n", "",
           ("tests/test_train.py", "-k", "overwrite")),
    Mutant("run recipe: paths kept relative", "vlmtrain/config.py",
           "    return os.path.normpath(os.path.join(base, path))", "    return path",
           ("tests/test_train.py", "-k", "overwrite")),
    Mutant("resume: the sample after the saved position inside a shard skipped", "vlmtrain/data/sources.py",
           "            if item >= first_item:", "            if item >= first_item + (first_item > 0):",
           ("tests/test_data.py", "-k", "resume")),
    Mutant("packing: same-length samples' tokens counted to the first of them", "vlmtrain/data/batch.py",
           "            sequence_ids[row, start:end] = index\n",
           "            sequence_ids[row, start:end] = [len(s) for s in sequences].index(len(ids))\n",
           ("tests/test_model.py", "-k", "packed")),
    Mutant("loss: chunks without the LM's logit soft-capping", "vlmtrain/modeling/loss.py",
           "    if softcap is not None:\n", "    if False:\n", ("tests/test_model.py", "-k", "chunked")),
    Mutant("loss: the last, partial chunk left out", "vlmtrain/modeling/loss.py",
           "range(0, hidden.shape[0], chunk)", "range(0, hidden.shape[0] - chunk + 1, chunk)",
           ("tests/test_model.py", "-k", "chunked")),
    Mutant("qwen tower: patches handed over row-major, not in merge windows", "vlmtrain/modeling/hf_vision.py",
           "index.permute(0, 2, 1, 3)", "index.permute(0, 1, 2, 3)",
           ("tests/test_model.py", "-k", "qwen2_5_vl_tower", "-m", "slow")),
    Mutant("qwen m-rope: the text after an image goes on from its last row, not its longer side", "vlmtrain/modeling/qwen_lm.py",
           "shift = rows * columns - (0 if continues else max(rows, columns))",
           "shift = rows * columns - (0 if continues else rows)", ("tests/test_qwen.py", "-k", "packed or computes")),
    Mutant("qwen m-rope: a packed sample's image shifts the next sample too", "vlmtrain/modeling/qwen_lm.py",
           "            after = later & (sample_ids[line] == sample_ids[line, first])\n", "            after = later\n",
           ("tests/test_qwen.py", "-k", "packed")),
    Mutant("qwen generation: tokens after the prompt without its 3-D position lead", "vlmtrain/modeling/qwen_lm.py",
           "            position_ids = (position_ids + self.rope_deltas[:, None]).expand(3, -1, -1)\n",
           "            position_ids = position_ids.expand(3, -1, -1)\n", ("tests/test_qwen.py",)),
    Mutant("qwen3 deepstack: the tower's layer features never reach the LM", "vlmtrain/modeling/vlm.py",
           'return embeds, ({"visual_pos_masks": placeholders, "deepstack_visual_embeds": layers} if layers else {})',
           "return embeds, {}", ("tests/test_qwen.py", "-k", "qwen3")),
    Mutant("qwen3 deepstack: generated tokens get the prompt's features too", "vlmtrain/modeling/qwen_lm.py",
           "if deepstack_visual_embeds and not decoding:", "if deepstack_visual_embeds:", ("tests/test_qwen.py", "-k", "qwen3")),
    Mutant("qwen3 pixels: normalised as Qwen2.5-VL's", "vlmtrain/modeling/hf_vision.py",
           "normalisation = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))", "normalisation = (CLIP_MEAN, CLIP_STD)",
           ("tests/test_qwen.py", "-k", "qwen3")),
    Mutant("qwen3 video: a temporal patch repeats its first frame", "vlmtrain/modeling/hf_vision.py",
           "patches = squares.view(count, self.frames, 3, size, size).transpose(1, 2).reshape(count, -1)",
           "patches = squares.view(count, self.frames, 3, size, size)[:, :1].expand(-1, self.frames, -1, -1, -1)"
           ".transpose(1, 2).reshape(count, -1)", ("tests/test_qwen.py", "-k", "written_as_the_family")),
    Mutant("qwen2.5 video: each temporal patch of a video's block moves the text after it on", "vlmtrain/modeling/qwen_lm.py",
           "shift = rows * columns - (0 if continues else max(rows, columns))", "shift = rows * columns - max(rows, columns)",
           ("tests/test_qwen.py", "-k", "each_video_sample")),
    Mutant("gemma4 video: frames written with the image token", "vlmtrain/families/gemma4.py",
           "return FrameLayout(token=VIDEO_TOKEN if VIDEO_TOKEN in tokenizer.get_vocab() else None)",
           "return FrameLayout(token=None)", ("tests/test_export.py", "-k", "answers_a_video")),
    Mutant("video sampling: Qwen3-VL's frames spread as the default sampler spreads them", "vlmtrain/modeling/prompt.py",
           'if self.sampling == "linspace":', 'if self.sampling == "linear":', ("tests/test_video.py", "-k", "sampled_are")),
    Mutant("video sampling: Qwen2.5-VL's frames not a whole number of temporal patches", "vlmtrain/modeling/prompt.py",
           "count = max(1, count // self.frames * self.frames)", "count = max(1, count)",
           ("tests/test_video.py", "-k", "qwen2_5_vl_frames")),
    Mutant("qwen2.5 video: a patch's seconds from the rate asked, not the frames sampled", "vlmtrain/data/video.py",
           "sampled_fps = len(picked) / total * rate", "sampled_fps = config.fps",
           ("tests/test_qwen.py", "-k", "each_video_sample")),
    Mutant("exported processor: a patch's seconds from the rate asked, not the frames sampled",
           "vlmtrain/modeling/processing_vlmtrain.py", "sampled_fps = len(picked) / len(frames) * fps", "sampled_fps = fps",
           ("tests/test_qwen.py", "-k", "native_checkpoint_with_training")),
    Mutant("key frame: added beside the sampled frames, not in place of the nearest", "vlmtrain/modeling/prompt.py",
           "if index not in picked and free:", "if index not in picked and not free:",
           ("tests/test_video.py", "-k", "key_frame", "-m", "slow")),
    Mutant("key frame: its unit at the video's budget", "vlmtrain/data/video.py",
           "max(fixed, default=budget), video, time))", "budget, video, time))",
           ("tests/test_video.py", "-k", "key_frame", "-m", "slow")),
    Mutant("eval at the records' budgets: frames at the model's image budget", "vlmtrain/evaluate/__init__.py",
           "model.video.budget if video is not None", "model.description.default_budget if video is not None",
           ("tests/test_video.py", "-k", "key_frame", "-m", "slow")),
    Mutant("exported processor: a video budget asked for is ignored", "vlmtrain/modeling/processing_vlmtrain.py",
           "video_budget = self.video_budget if video_budget is None else video_budget", "video_budget = self.video_budget",
           ("tests/test_export.py", "-k", "takes_videos")),
    Mutant("fsdp2: resume asks the checkpoint for the frozen weights too", "vlmtrain/train/fsdp.py",
           "get_model_state_dict(self.model).items() if key not in frozen}", "get_model_state_dict(self.model).items()}",
           ("tests/test_distributed.py", "-k", "sharded_resume and fsdp2")),
    Mutant("qlora: export merges the adapters into the 4-bit weights", "vlmtrain/export/run.py",
           "start = replace(plan.start, lm=replace(plan.start.lm, quantization=None))", "start = plan.start",
           ("tests/test_export.py", "-k", "qlora")),
    Mutant("exit: data workers left to multiprocessing's join", "vlmtrain/data/datamodule.py",
           "        if process.daemon:", "        if not process.daemon:",
           ("tests/test_errors.py", "-k", "nothing_usable and texts", "-m", "slow")),
]


def scratch_copy() -> Path:
    """The repository's files (not its environment or generated data) in a new folder."""
    folder = Path(tempfile.mkdtemp(prefix="vlmtrain-mutant-"))
    ignored = shutil.ignore_patterns(".venv", ".git", "runs", "wandb", "generated", "models", "__pycache__", ".pytest_cache")
    shutil.copytree(ROOT, folder / "repo", ignore=ignored)
    return folder / "repo"


def passes(repo: Path, tests: tuple[str, ...]) -> bool:
    """Whether ``tests`` pass in ``repo`` (python -m puts it first on sys.path: its vlmtrain is the one imported)."""
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    return subprocess.run(command, cwd=repo, capture_output=True, text=True).returncode == 0


def run(mutant: Mutant) -> tuple[bool, float]:
    """(caught, seconds): the mutant's tests pass on the real code and fail with the mutant applied."""
    repo = scratch_copy()
    try:
        if not passes(repo, mutant.tests):
            raise SystemExit(f"{mutant.name}: its tests fail on the real code: {' '.join(mutant.tests)}")
        path = repo / mutant.file
        source = path.read_text()
        if source.count(mutant.old) != 1:
            raise SystemExit(f"{mutant.name}: {mutant.old!r} occurs {source.count(mutant.old)} times in {mutant.file}")
        path.write_text(source.replace(mutant.old, mutant.new))
        began = time.monotonic()
        caught = not passes(repo, mutant.tests)
        return caught, time.monotonic() - began
    finally:
        shutil.rmtree(repo.parent, ignore_errors=True)


def main(names: list[str]) -> int:
    chosen = [m for m in MUTANTS if not names or any(name in m.name for name in names)]
    missed = 0
    for mutant in chosen:
        caught, seconds = run(mutant)
        missed += not caught
        print(f"{'caught' if caught else 'MISSED':>6}  {seconds:5.1f} s  {mutant.name}", flush=True)
    print(f"{len(chosen) - missed} of {len(chosen)} mutants caught")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
