"""What our trainer costs per step beyond the bare training math, and what the latent/text cache saves.

    .venv/bin/python bench/train_step.py [--steps 30] [--rounds 5] [--resolution 64] [--threads 1]

On the tiny random FLUX (nothing is downloaded), CPU, fp32, one run, rounds interleaved so that
other load on the machine hits every variant alike; medians of the step times:
1. our trainer (fluxlora.training.trainer.train_lora, timed from one on_step callback to the next:
   no checkpoint or sample inside the timed steps) / a bare diffusers + peft loop written
   the way diffusers' train_dreambooth_lora_flux.py trains (cached latents and prompt embeddings,
   the same LoRA, AdamW, gradient clipping, loss.item() per step). Target <= 1.05.
2. the bare loop encoding every step's image with the VAE and caption with CLIP + T5 (no cache) /
   the bare loop with the cache: what caching saves per step (on the real FLUX.1 the encoders
   are also 10 GB of memory that caching frees).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import diffusers
import torch
import transformers
from diffusers import FluxPipeline
from diffusers.training_utils import cast_training_params
from peft import LoraConfig
from PIL import Image, ImageDraw

from fluxlora.common.offline import configure_hf_offline
from fluxlora.models.latents import encode_latents, image_ids, image_to_pixels, pack
from fluxlora.models.tiny_flux import write_tiny_flux
from fluxlora.training.trainer import TrainCallbacks, TrainConfig, train_lora

CAPTIONS = ["a red circle", "a blue square", "a green circle", "a yellow square"]
TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


def write_dataset(directory: Path, size: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for i, caption in enumerate(CAPTIONS):
        image = Image.new("RGB", (size, size), "white")
        shape = ImageDraw.Draw(image).ellipse if "circle" in caption else ImageDraw.Draw(image).rectangle
        shape((size // 5, size // 5, size - size // 5, size - size // 5), fill=caption.split()[1])
        image.save(directory / f"{i}.png")
        (directory / f"{i}.txt").write_text(caption)
    return directory


def config(args) -> TrainConfig:
    return TrainConfig(resolution=args.resolution, max_steps=args.steps, learning_rate=1e-4, rank=16, alpha=16,
                       target_modules=TARGETS, checkpoint_every=0, sample_every=0, gradient_checkpointing=False,
                       precision="fp32", timestep_sampling="sigmoid", seed=0)


def ours(model_dir: Path, dataset: Path, work: Path, args) -> list[float]:
    """Step times through train_lora: from one on_step call to the next, so everything the loop
    does per step (stop check, batching, the step, history, callbacks) is counted."""
    stamps: list[float] = []
    callbacks = TrainCallbacks(on_step=lambda *_: stamps.append(time.perf_counter()))
    train_lora(config(args), model_dir, dataset, work / f"run-{time.monotonic_ns()}", callbacks, device="cpu")
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


class BareLoop:
    """diffusers' dreambooth LoRA recipe, nothing else: no callbacks, history, bucketing or resume state."""

    def __init__(self, model_dir: Path, dataset: Path, args):
        self.pipe = FluxPipeline.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
        self.pipe.set_progress_bar_config(disable=True)
        for module in (self.pipe.vae, self.pipe.text_encoder, self.pipe.text_encoder_2):
            module.requires_grad_(False).eval()
        self.images = [Image.open(dataset / f"{i}.png").convert("RGB") for i in range(len(CAPTIONS))]
        self.transformer = self.pipe.transformer
        self.transformer.requires_grad_(False)
        torch.manual_seed(0)
        self.transformer.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS,
                                                init_lora_weights="gaussian"))
        cast_training_params(self.transformer, dtype=torch.float32)
        self.params = [p for p in self.transformer.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4, weight_decay=1e-4)
        self.transformer.train()
        self.cache = [self.encode(i) for i in range(len(CAPTIONS))]

    @torch.no_grad()
    def encode(self, i: int):
        latents = encode_latents(self.pipe.vae, image_to_pixels(self.pipe, self.images[i]))
        prompt_embeds, pooled, text_ids = self.pipe.encode_prompt(CAPTIONS[i], CAPTIONS[i], max_sequence_length=512)
        return latents, prompt_embeds, pooled, text_ids

    def run(self, steps: int, cached: bool) -> list[float]:
        seconds = []
        for step in range(steps):
            started = time.perf_counter()
            i = step % len(CAPTIONS)
            latents, prompt_embeds, pooled, text_ids = self.cache[i] if cached else self.encode(i)
            noise = torch.randn_like(latents)
            sigmas = torch.sigmoid(torch.randn(latents.shape[0]))
            noisy = (1 - sigmas.view(-1, 1, 1, 1)) * latents + sigmas.view(-1, 1, 1, 1) * noise
            prediction = self.transformer(
                hidden_states=pack(noisy), timestep=sigmas, guidance=None, pooled_projections=pooled,
                encoder_hidden_states=prompt_embeds, txt_ids=text_ids,
                img_ids=image_ids(latents.shape[2], latents.shape[3], latents.device, latents.dtype),
                return_dict=False,
            )[0]
            loss = torch.nn.functional.mse_loss(prediction.float(), pack(noise - latents))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            loss.item()
            seconds.append(time.perf_counter() - started)
        return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier timings)")
    args = parser.parse_args(argv)
    configure_hf_offline()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = write_tiny_flux(work / "tiny-flux")
        dataset = write_dataset(work / "dataset", args.resolution)
        bare = BareLoop(model_dir, dataset, args)
        bare.run(3, cached=True)  # warm-up
        times: dict[str, list[float]] = {"ours": [], "bare": [], "bare, no cache": []}
        for _ in range(args.rounds):
            times["ours"] += ours(model_dir, dataset, work, args)
            times["bare"] += bare.run(args.steps, cached=True)[1:]
            times["bare, no cache"] += bare.run(args.steps, cached=False)[1:]

    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"tiny FLUX, CPU fp32, {args.resolution}px, rank 16 on attention, {args.steps} steps x {args.rounds} "
          f"rounds, {args.threads} thread(s); median step time (first step of each round left out)")
    for name, value in median.items():
        quartiles = statistics.quantiles(times[name], n=4)
        print(f"  {name:<16} {value * 1000:8.2f} ms/step   (quartiles {quartiles[0] * 1000:.2f}-"
              f"{quartiles[2] * 1000:.2f}, {len(times[name])} steps)")
    print(f"our trainer / bare diffusers+peft loop: {median['ours'] / median['bare']:.3f}   (target <= 1.05)")
    print(f"no latent/text cache / cache:           {median['bare, no cache'] / median['bare']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
