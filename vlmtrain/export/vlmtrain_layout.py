"""vlmtrain's own export layout, its writer beside its reader:

    OUT/lm/                       the language model as a Hugging Face folder (config, safetensors, tokenizer),
                                  LoRA merged in; with an adapter kept, the base LM and OUT/lm-adapter/ (PEFT)
    OUT/vision/model.safetensors  encoder, pooling and projector weights (the description in its metadata)
    OUT/config.json, *.py, model.safetensors.index.json, processor_config.json, tokenizer files
                                  the folder as one transformers model with its processor (remote code, see
                                  :mod:`.transformers_model`; the index points at vision/ and lm/: no weight
                                  is stored twice)
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import PreTrainedTokenizerBase

from vlmtrain.data.config import VideoConfig
from vlmtrain.export.format import LM_DIR, VISION_DIR, VISION_PARTS, WEIGHTS_FILE
from vlmtrain.export.transformers_model import video_settings, write_transformers_model
from vlmtrain.families import frame_layout
from vlmtrain.model.description import ModelDescription
from vlmtrain.modeling.vlm import VisionLanguageModel
from vlmtrain.weights import read_weights


class VlmtrainLayout:
    """The vision parts in ``vision/``, the LM in ``lm/`` (see the module docstring)."""

    name = "vlmtrain"
    lm_folder = LM_DIR
    card_summary = "- language model: `lm/` (loads with `transformers.AutoModelForCausalLM.from_pretrained`)"

    def card_usage(self, prompt: str, budget: int) -> list[str]:
        """The model card's lines on serving the folder with transformers alone."""
        return [
            "",
            "With transformers alone (the folder ships its modelling and processing code):",
            "",
            "```python",
            "from PIL import Image",
            "from transformers import AutoModelForImageTextToText, AutoProcessor",
            'model = AutoModelForImageTextToText.from_pretrained("PATH/TO/THIS/FOLDER", trust_remote_code=True)',
            'processor = AutoProcessor.from_pretrained("PATH/TO/THIS/FOLDER", trust_remote_code=True)',
            f'inputs = processor({prompt!r}, [Image.open("page.png")], budget={budget})',
            "print(processor.decode(model.generate(**inputs, max_new_tokens=32)[0, inputs['input_ids'].shape[1]:]))",
            "# a video as its frames (PIL images, 2 a second unless training said otherwise), placed by <video>:",
            '# inputs = processor("<video>What happens?", videos=[frames], video_budget=70)',
            "```",
        ]

    def write(
        self,
        out: Path,
        model: VisionLanguageModel,
        description: ModelDescription,
        tokenizer: PreTrainedTokenizerBase,
        metadata: dict[str, str],
        video: VideoConfig,
        adapter: str | None = None,
    ) -> None:
        """Write ``model`` (its LM merged, or the base LM when ``adapter`` names the folder that keeps its LoRA
        adapter) into ``out``, its processor sampling and writing videos as training did (``video``, the family's
        frame layout)."""
        vision = {
            f"{part}.{name}": tensor.contiguous()
            for part in VISION_PARTS
            for name, tensor in getattr(model, part).state_dict().items()
        }
        (out / VISION_DIR).mkdir(parents=True, exist_ok=True)
        save_file(vision, str(out / VISION_DIR / WEIGHTS_FILE), metadata=metadata)
        # under the causal LM's own names (which the index maps), not those of the checkpoint it was read from
        model.lm.save_pretrained(out / LM_DIR, safe_serialization=True, save_original_format=False)
        tokenizer.save_pretrained(out / LM_DIR)
        videos = video_settings(frame_layout(description, tokenizer), video)
        write_transformers_model(
            out, description.to_dict(), model.geometry, model.lm, tokenizer, (VISION_DIR, LM_DIR), adapter, model.video_token_id,
            videos,
        )

    def weights_file(self, folder: Path) -> Path:
        return folder / VISION_DIR / WEIGHTS_FILE

    def vision_weights(self, folder: Path) -> dict[str, torch.Tensor]:
        return read_weights(self.weights_file(folder))


VLMTRAIN_LAYOUT = VlmtrainLayout()
