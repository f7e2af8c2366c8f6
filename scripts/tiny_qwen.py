"""A tiny Qwen2.5-VL or Qwen3-VL checkpoint with random weights, and a tokenizer that knows its vision tokens: what
the tests and the benchmarks train as a whole Qwen-VL model (no download; the shapes of the real ones, scaled down).

    python scripts/tiny_qwen.py OUT                      # OUT/checkpoint (Qwen2_5_VLForConditionalGeneration), OUT/tokenizer
    python scripts/tiny_qwen.py OUT --family qwen3_vl    # OUT/checkpoint (Qwen3VLForConditionalGeneration), OUT/tokenizer
    python scripts/tiny_qwen.py OUT --servable           # heads 32 wide, as vLLM's CPU attention needs (twice the width)
"""

from __future__ import annotations

import argparse
from pathlib import Path

VISION_TOKENS = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>"]
VIDEO_TOKEN = "<|video_pad|>"  # every Qwen-VL tokenizer has it (vLLM's Qwen processors look it up)
TOWER = {  # Qwen2.5-VL's vision tower: windows of 2x2 tokens in block 0, full attention in block 1
    "depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 32, "window_size": 56,
    "fullatt_block_indexes": [1],
}
QWEN3_TOWER = {  # Qwen3-VL's: a 4x4 table of learned positions, DeepStack features from blocks 0 and 1 to LM layers 0 and 1
    "depth": 3, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 32,
    "num_position_embeddings": 16, "deepstack_visual_indexes": [0, 1],
}
TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
        "max_position_embeddings": 4096}
FAMILIES = {  # family → (config class, model class, its tower, its text model's RoPE settings)
    "qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration", TOWER,
                   {"rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}}),
    "qwen3_vl": ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration", QWEN3_TOWER,
                 {"head_dim": 16, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5, "mrope_section": [2, 3, 3],
                                                      "mrope_interleaved": True}}),
}


SERVABLE = {"hidden_size": 64, "intermediate_size": 128}  # heads of 32: vLLM's CPU attention has no 16-wide kernel


def servable(config: dict) -> dict:
    """``config`` twice as wide (every head 32 wide, each M-RoPE section twice as long)."""
    wider = {**config, **SERVABLE, **({"out_hidden_size": 64} if "out_hidden_size" in config else {})}
    if "head_dim" in config:
        wider["head_dim"] = 32
    for key in ("rope_scaling", "rope_parameters"):
        if key in config:
            wider[key] = {**config[key], "mrope_section": [4, 6, 6]}
    return wider


def write_tiny_qwen(out: Path, seed: int = 0, family: str = "qwen2_5_vl", wide: bool = False):
    """Write ``out/checkpoint`` and ``out/tokenizer`` (``wide``: :func:`servable` sizes); returns the transformers
    model written."""
    import torch
    import transformers

    from vlmtrain.modeling.tokenizers import build_byte_tokenizer

    config_class, model_class, tower, rope = FAMILIES[family]
    tokenizer = build_byte_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [*VISION_TOKENS, VIDEO_TOKEN]})
    tokenizer.save_pretrained(out / "tokenizer")
    start, image, end = (tokenizer.convert_tokens_to_ids(token) for token in VISION_TOKENS)
    text = {**TEXT, **rope, "vocab_size": len(tokenizer)}
    config = getattr(transformers, config_class)(
        text_config=servable(text) if wide else text, vision_config=servable(tower) if wide else tower, image_token_id=image,
        vision_start_token_id=start, vision_end_token_id=end, video_token_id=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
    )
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(config).eval()
    model.save_pretrained(out / "checkpoint")
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--family", choices=FAMILIES, default="qwen2_5_vl")
    parser.add_argument("--servable", action="store_true", help="heads 32 wide (vLLM's CPU attention needs them)")
    args = parser.parse_args()
    write_tiny_qwen(args.out, family=args.family, wide=args.servable)
    print(f"wrote {args.out / 'checkpoint'} and {args.out / 'tokenizer'} (overrides to train it: docs/training-benchmark.md)")


if __name__ == "__main__":
    main()
