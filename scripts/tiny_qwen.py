"""A tiny Qwen2.5-VL checkpoint with random weights, and a tokenizer that knows its vision tokens: what the tests
and the benchmarks train as a whole Qwen2.5-VL (no download; the shapes of the real one, scaled down).

    python scripts/tiny_qwen.py OUT      # OUT/checkpoint (Qwen2_5_VLForConditionalGeneration), OUT/tokenizer
"""

from __future__ import annotations

import argparse
from pathlib import Path

VISION_TOKENS = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>"]
TOWER = {  # Qwen2.5-VL's vision tower: windows of 2x2 tokens in block 0, full attention in block 1
    "depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 32, "window_size": 56,
    "fullatt_block_indexes": [1],
}


def write_tiny_qwen(out: Path, seed: int = 0):
    """Write ``out/checkpoint`` and ``out/tokenizer``; returns the transformers model written."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from vlmtrain.modeling.tokenizers import build_byte_tokenizer

    tokenizer = build_byte_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": VISION_TOKENS})
    tokenizer.save_pretrained(out / "tokenizer")
    start, image, end = (tokenizer.convert_tokens_to_ids(token) for token in VISION_TOKENS)
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 1, "vocab_size": len(tokenizer), "max_position_embeddings": 4096,
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}}
    config = Qwen2_5_VLConfig(text_config=text, vision_config=TOWER, image_token_id=image, vision_start_token_id=start,
                              vision_end_token_id=end)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.save_pretrained(out / "checkpoint")
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    write_tiny_qwen(args.out)
    print(f"wrote {args.out / 'checkpoint'} and {args.out / 'tokenizer'} (overrides to train it: docs/training-benchmark.md)")


if __name__ == "__main__":
    main()
