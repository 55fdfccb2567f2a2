"""Tiny random stand-ins for what evaluation loads, for tests, benches and demos without downloads:
a CLIP image-text model in the transformers directory layout, LoRA files for the tiny FLUX, and a
whole stored training run made of them."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from fluxlora.common import keys
from fluxlora.common.storage import ArtifactStore
from fluxlora.models.tiny_tokenizers import CLIP_MAX_LENGTH, build_clip_tokenizer

ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TRIGGER = "fluxone"
PROMPT = "fluxone, a bottle on a table"
COLOURS = ("red", "blue", "green", "orange")


def write_tiny_clip(directory: Path, seed: int = 0, image_size: int = 32) -> Path:
    """A CLIPModel with 32-wide towers, its word-level tokenizer and image processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    directory = Path(directory)
    tokenizer = build_clip_tokenizer()
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": CLIP_MAX_LENGTH,
            # The pooled text embedding is read at the eos token: the config must know its id.
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
                       "num_attention_heads": 4, "image_size": image_size, "patch_size": 8},
        projection_dim=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    ).save_pretrained(directory)
    return directory


def write_random_lora(
    model_dir: Path, out_dir: Path, seed: int, rank: int = 4, targets: Sequence[str] = ATTENTION_TARGETS,
) -> Path:
    """A LoRA for the FLUX transformer in model_dir with random A and B (so it changes outputs),
    saved as diffusers does; returns the .safetensors file."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from peft import LoraConfig, get_peft_model_state_dict

    transformer = FluxTransformer2DModel.from_pretrained(Path(model_dir) / "transformer", local_files_only=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer.add_adapter(
            LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets), init_lora_weights=False),
            adapter_name="random",
        )
    out_dir = Path(out_dir)
    FluxPipeline.save_lora_weights(
        out_dir, transformer_lora_layers=get_peft_model_state_dict(transformer, adapter_name="random")
    )
    return out_dir / "pytorch_lora_weights.safetensors"


def store_random_run(
    store: ArtifactStore, flux_dir: Path, run_id: str = "trn-fake00000001", steps: Sequence[int] = (10, 20, 30),
    resolution: int = 64, dataset_id: str = "ds-fake00000001",
) -> dict:
    """A training run stored as the training service stores one, in seconds: run.json, one random
    LoRA checkpoint per step, and a 4-image captioned dataset. Returns run.json's content."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for i, colour in enumerate(COLOURS):
            image = Image.new("RGB", (resolution, resolution), "white")
            ImageDraw.Draw(image).ellipse((12, 8, resolution - 12, resolution - 8), fill=colour)
            image.save(tmp / f"img{i}.png")
            store.put_file(keys.dataset_images(dataset_id) + f"img{i}.png", tmp / f"img{i}.png")
            store.put_bytes(keys.dataset_images(dataset_id) + f"img{i}.txt", f"{TRIGGER}, a {colour} bottle".encode())
        store.put_json(keys.dataset_manifest(dataset_id), {"dataset_id": dataset_id,
                                                           "images": [{"stem": f"img{i}"} for i in range(4)]})
        for n, step in enumerate(steps):
            lora = write_random_lora(flux_dir, tmp / f"lora-{step}", seed=100 + n)
            store.put_file(keys.checkpoint_prefix(run_id, step) + lora.name, lora)
    info = {
        "run_id": run_id,
        "dataset_id": dataset_id,
        "base_model": str(flux_dir),
        "trigger_word": TRIGGER,
        "config": {"resolution": resolution, "sample_prompts": [PROMPT], "guidance": 3.5, "max_sequence_length": 32},
    }
    store.put_json(keys.run_info(run_id), info)
    return info
