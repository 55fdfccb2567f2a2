"""Runs one generate job: prompts x seeds with LoRAs at their strengths, on the process's cached
base pipeline, written to the store as PNGs under generations/<job id>/."""

from __future__ import annotations

from google.protobuf import json_format

from fluxlora.common import keys
from fluxlora.evaluation.job_support import control_image, device_and_dtype, inference_loading, settings_of
from fluxlora.evaluation.pipelines import base_pipeline
from fluxlora.evaluation.render import generate_images
from fluxlora.jobs.context import JobContext
from fluxlora.models.base_model import resolve_base_model
from fluxlora_api.v1 import evaluation_pb2 as pb


def run_generate(ctx: JobContext, spec: pb.GenerateSpec) -> pb.GenerateResult:
    settings = settings_of(ctx)
    prefix = keys.generation_prefix(ctx.job_id)
    loras = []
    for i, lora in enumerate(spec.loras):
        ctx.check_cancelled()
        # The validated spec holds a key for every LoRA, run checkpoints included.
        loras.append((ctx.store.get_file(lora.key, ctx.scratch / "loras" / f"{i:02d}.safetensors"), lora.strength))
    ctx.progress("loading base model", 0)
    model_dir = resolve_base_model(spec.base_model, spec.base_components, ctx.store, settings.cache_dir,
                                   spec.family)
    device, dtype = device_and_dtype(settings)
    loading = inference_loading(settings, device)
    prompts = list(spec.prompts)
    seeds = [spec.seed + i for i in range(spec.images_per_prompt)]
    with base_pipeline(model_dir, device, dtype, loading.quantization, loading.cpu_offload, spec.family) as pipe:
        images = generate_images(
            pipe, loras, prompts, seeds, spec.width, spec.height, spec.steps, spec.guidance,
            progress=lambda done, total: (ctx.check_cancelled(), ctx.progress("generating", done, total, "image")),
            control=control_image(ctx, spec.control_image),
        )

    result = pb.GenerateResult(generation_id=ctx.job_id, loras=spec.loras)
    out = ctx.scratch / "images"
    out.mkdir()
    for p, (prompt, row) in enumerate(zip(prompts, images, strict=True)):
        for seed, image in zip(seeds, row, strict=True):
            path = out / f"{p:03d}-seed{seed}.png"
            image.save(path)
            ctx.upload(path, prefix + path.name, "image")
            result.images.append(
                pb.GeneratedImage(prompt_index=p, prompt=prompt, seed=seed, image_key=prefix + path.name)
            )
    report_key = prefix + "report.json"
    report_info = ctx.store.put_json(report_key, {
        "generation_id": ctx.job_id, "spec": json_format.MessageToDict(spec),
        "images": [json_format.MessageToDict(i) for i in result.images],
    })
    ctx.add_artifact(report_info, "report")  # put's info has the sha256 (a local stat has none)
    return result
