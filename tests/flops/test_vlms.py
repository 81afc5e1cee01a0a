"""Vision-language models: the engine against torch's FlopCounterMode, step by step.

Each VLM is built tiny from its config (a CLIP or SigLIP vision tower, a projector, a Llama or
Gemma language model). A row is its images' placeholder tokens followed by text, and
``pixel_values`` holds the same number of images of the same size for every row. The engine counts
the text stream's tokens (placeholders included: the language model runs them) and the rows (the
vision tower and projector run once per image), so every case is checked at two text lengths and
at one and two rows, with one engine built from a batch of a third shape.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model

from tests.conftest import LENGTHS, check_engine, one_per_family

IMAGE_TOKEN = 100
_IMAGE_SIZE = 16
_VISION = {
    "image_size": _IMAGE_SIZE,
    "patch_size": 4,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
}
_TEXT = {
    "vocab_size": 128,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_position_embeddings": 128,
    "pad_token_id": 0,
}


def llava() -> torch.nn.Module:
    """Llava at its default ``vision_feature_layer=-2``: the last vision layer runs, and its output
    (part of ``image_outputs``) is returned but never reaches the loss."""
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**_VISION),
        text_config=transformers.LlamaConfig(**_TEXT),
        image_token_id=IMAGE_TOKEN,
    )
    return transformers.LlavaForConditionalGeneration(config)


def gemma3() -> torch.nn.Module:
    """Gemma-3: SigLIP, image tokens pooled to ``mm_tokens_per_image``, bidirectional attention over
    each image's tokens, sliding-window layers in the language model."""
    config = transformers.Gemma3Config(
        vision_config=_VISION,
        text_config={**_TEXT, "sliding_window": 512},  # longer than every test row: windows are tested apart
        image_token_index=IMAGE_TOKEN,
        boi_token_index=101,
        eoi_token_index=102,
        mm_tokens_per_image=4,
    )
    return transformers.Gemma3ForConditionalGeneration(config)


def paligemma() -> torch.nn.Module:
    """PaliGemma: SigLIP and a Gemma with a bidirectional prefix (image and prompt)."""
    config = transformers.PaliGemmaConfig(
        vision_config={**_VISION, "projection_dim": 32},
        text_config=_TEXT,
        image_token_index=IMAGE_TOKEN,
        projection_dim=32,
    )
    return transformers.PaliGemmaForConditionalGeneration(config)


_GRID = (1, 4, 4)  # Qwen2-VL: an image of 1 x 4 x 4 patches, merged 2 x 2 into 4 tokens
_QWEN_TOKENS = {
    "image_token_id": 120,
    "video_token_id": 121,
    "vision_start_token_id": 122,
    "vision_end_token_id": 123,
}


def qwen2_vl() -> torch.nn.Module:
    """Qwen2-VL: images as flattened patches sized by ``image_grid_thw``, whose values the model reads
    (per-image vision attention, M-RoPE positions of the text)."""
    config = transformers.Qwen2VLConfig(
        text_config={**_TEXT, "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]}},
        vision_config={
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": 32,
            "num_heads": 4,
            "mlp_ratio": 2,
            "patch_size": 2,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        **_QWEN_TOKENS,
    )
    return transformers.Qwen2VLForConditionalGeneration(config)


def qwen2_5_vl() -> torch.nn.Module:
    """Qwen2.5-VL: as Qwen2-VL, with windowed attention in the vision tower but for its full-attention blocks."""
    config = transformers.Qwen2_5_VLConfig(
        text_config={**_TEXT, "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]}},
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "out_hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 4,
            "patch_size": 2,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 4,
            "fullatt_block_indexes": [1],
        },
        **_QWEN_TOKENS,
    )
    return transformers.Qwen2_5_VLForConditionalGeneration(config)


# name: (builder, placeholder tokens per image)
ARCHITECTURES = {
    "llava": (llava, 16),
    "gemma3": (gemma3, 4),
    "paligemma": (paligemma, 16),
    "qwen2_vl": (qwen2_vl, 4),
    "qwen2_5_vl": (qwen2_5_vl, 4),
}


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return ARCHITECTURES[name][0]().train()


def lora(model: torch.nn.Module) -> torch.nn.Module:
    """Adapters on every linear layer, the vision tower's too: their weight gradients run only where
    their outputs reach the loss."""
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))


def vlm_batch(name: str, rows: int, text: int, images_per_row: int = 1) -> dict[str, torch.Tensor]:
    """Each row: its images' placeholders, then ``text`` text tokens; labels on every token."""
    generator = torch.Generator().manual_seed(100 * rows + text)
    placeholders = ARCHITECTURES[name][1] * images_per_row
    ids = torch.randint(3, IMAGE_TOKEN - 10, (rows, placeholders + text), generator=generator)
    ids[:, :placeholders] = IMAGE_TOKEN
    image_tokens = torch.zeros_like(ids)
    image_tokens[:, :placeholders] = 1
    if name.startswith("qwen"):
        images = _qwen_images(ids, placeholders, images_per_row, generator)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(), **images}
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    pixels = torch.randn(rows * images_per_row, 3, _IMAGE_SIZE, _IMAGE_SIZE, generator=generator)
    batch["pixel_values"] = pixels
    if name != "llava":
        batch["token_type_ids"] = image_tokens  # Gemma's image attention and PaliGemma's prefix
    return batch


def _qwen_images(
    ids: torch.Tensor, placeholders: int, images_per_row: int, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Qwen2-VL's image inputs: the placeholders between vision start and end tokens (written into
    ``ids``, one image a row), flattened patches, and each image's grid."""
    ids[:, 0] = _QWEN_TOKENS["vision_start_token_id"]
    ids[:, 1 : placeholders + 1] = _QWEN_TOKENS["image_token_id"]
    ids[:, placeholders + 1] = _QWEN_TOKENS["vision_end_token_id"]
    token_types = torch.zeros_like(ids)
    token_types[:, 1 : placeholders + 1] = 1
    images = ids.shape[0] * images_per_row
    patches = _GRID[0] * _GRID[1] * _GRID[2]
    return {
        "mm_token_type_ids": token_types,
        "pixel_values": torch.randn(images * patches, 3 * 2 * 2 * 2, generator=generator),
        "image_grid_thw": torch.tensor([_GRID] * images),
    }


def batches(name: str) -> list[dict[str, torch.Tensor]]:
    return [vlm_batch(name, rows, text) for rows in (1, 2) for text in LENGTHS]


@pytest.mark.parametrize("name", one_per_family(ARCHITECTURES, "llava"))
def test_full_fine_tuning(name: str) -> None:
    check_engine(build(name), vlm_batch(name, 3, 5), batches(name))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_lora(name: str) -> None:
    check_engine(lora(build(name)), vlm_batch(name, 3, 5), batches(name))


def test_two_images_per_row() -> None:
    """Images scale with the rows at any fixed number of images per row (here two)."""
    two = [vlm_batch("llava", rows, text, images_per_row=2) for rows in (1, 2) for text in LENGTHS]
    check_engine(build("llava"), vlm_batch("llava", 3, 5, images_per_row=2), two)
