"""ComfyUI's rules for loading a kohya-format LoRA into a FLUX-family model, restated from its source so
the tests can check our kohya file against them without ComfyUI installed (GPL code: facts taken, not
copied).

Source read: github.com/comfyanonymous/ComfyUI (now Comfy-Org/ComfyUI) at COMFYUI_COMMIT, v0.9.1 plus two
commits (2026-01-13), which has FLUX.2 (model_base.Flux2); the tree was read from a fork whose master
was exactly that upstream commit (github.com/codeflash-ai/ComfyUI). SOURCES lists the files and lines
each rule comes from.

1. Which key names a model takes (lora.py model_lora_keys_unet): every weight
   `diffusion_model.<name>.weight` in the model's state dict is the target of the LoRA stem
   `lora_unet_<name, "." written "_">`. For model_base.Flux and its subclasses Flux2 and Chroma ComfyUI
   also takes diffusers names (`transformer.<FLUX.1 diffusers name>`, utils.flux_to_diffusers, q/k/v
   mapped to row slices of the fused weights) and `<...>.linear1_qkv`; a kohya file uses neither.
2. Which keys of the file it reads (lora.py load_lora, weight_adapter/lora.py LoRAAdapter.load): per
   stem `<stem>.lora_up.weight` and `<stem>.lora_down.weight`, and `<stem>.alpha` if present (read
   with .item()); every other key is logged "lora key not loaded" and ignored. lora_convert.convert_lora
   renames only BFL control, Wan Fun and USO LoRAs, none of which ours looks like.
3. How it applies one (weight_adapter/lora.py LoRAAdapter.calculate_weight):
   weight += strength * alpha / rank * (up @ down).reshape(weight.shape), rank = down.shape[0], no alpha
   meaning alpha = rank. A product that cannot take the weight's shape is logged and dropped; one with
   as many elements but another shape would be reshaped silently, so the tests compare shapes exactly.
4. The model's weights (ldm/flux/model.py, ldm/flux/layers.py, ldm/chroma/model.py, ldm/chroma/layers.py):
   comfyui_weights() below, for the hyper-parameters model_detection.py reads from a checkpoint.
5. Metadata: LoraLoader reads the file with load_torch_file(safe_load=True) and never its metadata, so
   no ss_* field changes what ComfyUI loads.

`python tests/comfyui_lora_keys.py` writes tests/data/comfyui_lora_keys.json: each family's stems with
the weight and shape they patch, for the tiny models the tests train (1 double and 1 single block).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

COMFYUI_REPOSITORY = "https://github.com/comfyanonymous/ComfyUI"
COMFYUI_COMMIT = "d9dc02a7d602a1918b9dabfc91890e6689f6f16d"
SOURCES = {
    "comfy/lora.py": "37-95 load_lora; 175-186 lora_unet_ stems; 255-266 Flux diffusers and linear1_qkv keys; "
                     "370-383 offsets",
    "comfy/weight_adapter/lora.py": "81-148 LoRAAdapter.load; 150-212 calculate_weight",
    "comfy/lora_convert.py": "36-43 convert_lora",
    "comfy/sd.py": "72-97 load_lora_for_models",
    "nodes.py": "670-687 LoraLoader.load_lora",
    "comfy/model_patcher.py": "557-579 add_patches (only keys of the model's state dict)",
    "comfy/utils.py": "573-677 flux_to_diffusers",
    "comfy/model_base.py": "837 Flux; 922 Flux2(Flux); 1457 Chroma(Flux)",
    "comfy/supported_models.py": "695-769 Flux, FluxSchnell, Flux2; 1278-1298 Chroma",
    "comfy/model_detection.py": "189-275 flux / flux2 / chroma hyper-parameters",
    "comfy/ldm/flux/model.py": "22-130 FluxParams, Flux.__init__",
    "comfy/ldm/flux/layers.py": "50-55 MLPEmbedder; 74-88 build_mlp; 111-119 SelfAttention; 129-134 Modulation; "
                                "171-198 DoubleStreamBlock; 276-323 SingleStreamBlock; 352-357 LastLayer",
    "comfy/ldm/chroma/model.py": "25-113 ChromaParams, Chroma.__init__",
    "comfy/ldm/chroma/layers.py": "27-33 Approximator; 51-55 LastLayer",
}
DATA_FILE = Path(__file__).parent / "data" / "comfyui_lora_keys.json"
STEM_PREFIX = "lora_unet_"
READ_SUFFIXES = (".lora_up.weight", ".lora_down.weight", ".alpha")


@dataclass(frozen=True)
class ComfyParams:
    """What decides the shapes of a ComfyUI FLUX-family model's linear layers."""

    kind: str  # "flux" (model_base.Flux: FLUX.1, Kontext), "flux2" (model_base.Flux2), "chroma"
    hidden_size: int
    depth: int  # double blocks
    depth_single_blocks: int
    img_in: int  # in_channels * patch_size**2
    final_out: int  # out_channels * patch_size**2
    context_in_dim: int
    vec_in_dim: int | None  # FLUX.1's pooled CLIP vector; None for FLUX.2 and Chroma
    guidance_embed: bool
    approximator: tuple[int, int, int] = (0, 0, 0)  # Chroma: in_dim, hidden_dim, n_layers

    @property
    def mlp_ratio(self) -> float:
        return 3.0 if self.kind == "flux2" else 4.0  # model_detection fixes both


# ComfyUI's model kind for each of our families (supported_models: Kontext is a plain Flux model).
KIND = {"flux1-dev": "flux", "flux1-kontext": "flux", "chroma": "chroma", "flux2-dev": "flux2",
        "flux2-klein": "flux2"}


def comfyui_params(family: str, config) -> ComfyParams:
    """The hyper-parameters model_detection reads from this diffusers transformer's weights (block
    counts, widths, which embedders exist). The values it fixes for the released checkpoints and
    that no linear layer's shape depends on (heads, rope axes) are left out; the output width,
    which it fixes too, is the model's own, so the tiny models' final layer has its real shape."""
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    kind = KIND[family]
    approximator = (0, 0, 0)
    if kind == "chroma":
        approximator = (config["approximator_num_channels"], config["approximator_hidden_dim"],
                        config["approximator_layers"])
    return ComfyParams(
        kind=kind, hidden_size=hidden, depth=config["num_layers"], depth_single_blocks=config["num_single_layers"],
        img_in=config["in_channels"], final_out=config.get("out_channels") or config["in_channels"],
        context_in_dim=config["joint_attention_dim"],
        vec_in_dim=config.get("pooled_projection_dim") if kind == "flux" else None,
        guidance_embed=bool(config.get("guidance_embeds", False)) and kind != "chroma",
        approximator=approximator,
    )


def comfyui_weights(p: ComfyParams) -> dict[str, tuple[int, int]]:
    """Every linear weight of ComfyUI's diffusion model (names without "diffusion_model." and
    ".weight") with its (out, in) shape. Norm scales (RMSNorm .scale) are no `.weight` and take no LoRA."""
    h = p.hidden_size
    mlp = int(h * p.mlp_ratio)
    flux2 = p.kind == "flux2"
    modulated_blocks = p.kind == "flux"  # FLUX.2: one global modulation; Chroma: the approximator's
    w: dict[str, tuple[int, int]] = {"img_in": (h, p.img_in), "txt_in": (h, p.context_in_dim)}
    if p.kind == "chroma":
        a_in, a_hidden, a_layers = p.approximator
        w["distilled_guidance_layer.in_proj"] = (a_hidden, a_in)
        for i in range(a_layers):
            w[f"distilled_guidance_layer.layers.{i}.in_layer"] = (a_hidden, a_hidden)
            w[f"distilled_guidance_layer.layers.{i}.out_layer"] = (a_hidden, a_hidden)
        w["distilled_guidance_layer.out_proj"] = (h, a_hidden)
    else:
        w.update(_mlp_embedder("time_in", 256, h))
        if p.vec_in_dim is not None:
            w.update(_mlp_embedder("vector_in", p.vec_in_dim, h))
        if p.guidance_embed:
            w.update(_mlp_embedder("guidance_in", 256, h))
    for i in range(p.depth):
        for stream in ("img", "txt"):
            block = f"double_blocks.{i}.{stream}_"
            if modulated_blocks:
                w[block + "mod.lin"] = (6 * h, h)
            w[block + "attn.qkv"] = (3 * h, h)
            w[block + "attn.proj"] = (h, h)
            w[block + "mlp.0"] = (2 * mlp if flux2 else mlp, h)  # FLUX.2: SiLU-gated, two halves
            w[block + "mlp.2"] = (h, mlp)
    for i in range(p.depth_single_blocks):
        block = f"single_blocks.{i}."
        w[block + "linear1"] = (3 * h + (2 * mlp if flux2 else mlp), h)  # q | k | v | MLP in
        w[block + "linear2"] = (h, h + mlp)  # attention out | MLP out
        if modulated_blocks:
            w[block + "modulation.lin"] = (3 * h, h)
    w["final_layer.linear"] = (p.final_out, h)
    if p.kind != "chroma":
        w["final_layer.adaLN_modulation.1"] = (2 * h, h)
    if flux2:
        w["double_stream_modulation_img.lin"] = (6 * h, h)
        w["double_stream_modulation_txt.lin"] = (6 * h, h)
        w["single_stream_modulation.lin"] = (3 * h, h)
    return w


def _mlp_embedder(name: str, n_in: int, h: int) -> dict[str, tuple[int, int]]:
    return {f"{name}.in_layer": (h, n_in), f"{name}.out_layer": (h, h)}


def lora_stems(weights: dict[str, tuple[int, int]]) -> dict[str, str]:
    """Rule 1: the kohya stem ComfyUI gives each weight -> that weight's name."""
    return {STEM_PREFIX + name.replace(".", "_"): name for name in weights}


def key_map_for(family: str, config) -> dict[str, dict]:
    """The data file's entry for a family: stem -> {"weight": name, "shape": [out, in]}."""
    weights = comfyui_weights(comfyui_params(family, config))
    return {stem: {"weight": name, "shape": list(weights[name])} for stem, name in sorted(lora_stems(weights).items())}


def comfyui_delta(kohya: dict[str, torch.Tensor], stem: str) -> torch.Tensor:
    """Rule 3: what ComfyUI adds to the stem's weight at strength 1, in float32."""
    up, down = kohya[stem + ".lora_up.weight"].float(), kohya[stem + ".lora_down.weight"].float()
    alpha = kohya[stem + ".alpha"].item() if stem + ".alpha" in kohya else down.shape[0]
    return up @ down * (alpha / down.shape[0])


def flux1_diffusers_names(p: ComfyParams) -> dict[str, tuple[str, int, int, bool]]:
    """utils.flux_to_diffusers restated for weights: FLUX.1 diffusers module -> (ComfyUI weight, first
    row, rows, scale/shift swapped). ComfyUI applies diffusers-named LoRAs of model_base.Flux and its
    subclasses (Chroma's blocks have the same names) through it, so it is also how its rows read back
    as diffusers' modules."""
    h = p.hidden_size
    names: dict[str, tuple[str, int, int, bool]] = {}

    def whole(diffusers: str, comfy: str, rows: int, swap: bool = False) -> None:
        names[diffusers] = (comfy, 0, rows, swap)

    for i in range(p.depth):
        src, dst = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for part, names_of in enumerate((("to_q", "add_q_proj"), ("to_k", "add_k_proj"), ("to_v", "add_v_proj"))):
            names[src + "attn." + names_of[0]] = (dst + "img_attn.qkv", part * h, h, False)
            names[src + "attn." + names_of[1]] = (dst + "txt_attn.qkv", part * h, h, False)
        for diffusers, comfy in (("attn.to_out.0", "img_attn.proj"), ("norm1.linear", "img_mod.lin"),
                                 ("norm1_context.linear", "txt_mod.lin"), ("attn.to_add_out", "txt_attn.proj"),
                                 ("ff.net.0.proj", "img_mlp.0"), ("ff.net.2", "img_mlp.2"),
                                 ("ff_context.net.0.proj", "txt_mlp.0"), ("ff_context.net.2", "txt_mlp.2")):
            whole(src + diffusers, dst + comfy, -1)
    for i in range(p.depth_single_blocks):
        src, dst = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for part, name in enumerate(("attn.to_q", "attn.to_k", "attn.to_v")):
            names[src + name] = (dst + "linear1", part * h, h, False)
        names[src + "proj_mlp"] = (dst + "linear1", 3 * h, 4 * h, False)
        whole(src + "norm.linear", dst + "modulation.lin", -1)
        whole(src + "proj_out", dst + "linear2", -1)
    for comfy, diffusers in (("final_layer.linear", "proj_out"), ("img_in", "x_embedder"),
                             ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
                             ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
                             ("txt_in", "context_embedder"),
                             ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
                             ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
                             ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
                             ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2")):
        whole(diffusers, comfy, -1)
    whole("norm_out.linear", "final_layer.adaLN_modulation.1", -1, swap=True)
    return names


def diffusers_file_targets(p: ComfyParams) -> dict[str, str]:
    """What ComfyUI does with our other file, the diffusers/peft one (lora.py 255-266): it knows
    `transformer.<module>` for FLUX.1's diffusers module names only, on every model_base.Flux subclass
    (Flux2 and Chroma too) -> the ComfyUI weight. Such a file has no `.alpha` keys (peft keeps alpha in
    the metadata), so ComfyUI applies it at scale 1, not alpha/rank."""
    return {"transformer." + module: comfy for module, (comfy, *_) in flux1_diffusers_names(p).items()}


def as_diffusers_deltas(p: ComfyParams, deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI's per-weight deltas (keyed by ComfyUI weight name) as deltas of the diffusers
    transformer's modules. FLUX.1 / Kontext / Chroma: ComfyUI's own flux_to_diffusers rows. FLUX.2,
    for which ComfyUI has no diffusers names: diffusers' single-file converter, which is how a
    ComfyUI/BFL FLUX.2 checkpoint becomes Flux2Transformer2DModel."""
    if p.kind == "flux2":
        from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

        converted = convert_flux2_transformer_checkpoint_to_diffusers({f"{k}.weight": v for k, v in deltas.items()})
        return {k.removesuffix(".weight"): v for k, v in converted.items()}
    out = {}
    for module, (comfy, first, rows, swap) in flux1_diffusers_names(p).items():
        if comfy in deltas:
            delta = deltas[comfy] if rows < 0 else deltas[comfy].narrow(0, first, rows)
            out[module] = torch.cat(delta.chunk(2)[::-1]) if swap else delta
    return out


def tiny_transformer(family: str):
    """The transformer of the family's tiny model (fluxlora.models.tiny_*), the shape the tests train."""
    from fluxlora.models.tiny_chroma import build_tiny_chroma
    from fluxlora.models.tiny_flux import build_tiny_flux
    from fluxlora.models.tiny_flux2 import build_tiny_flux2_dev, build_tiny_flux2_klein
    from fluxlora.models.tiny_kontext import build_tiny_kontext

    builders = {"flux1-dev": lambda: build_tiny_flux(guidance_embeds=True), "flux1-kontext": build_tiny_kontext,
                "chroma": build_tiny_chroma, "flux2-dev": build_tiny_flux2_dev, "flux2-klein": build_tiny_flux2_klein}
    if family not in builders:
        raise ValueError(f"no tiny transformer for {family!r} here: add its builder and a ComfyUI kind (KIND)")
    return builders[family]().transformer


def tiny_transformer_configs() -> dict[str, dict]:
    from fluxlora.models.families import FAMILIES

    return {family: dict(tiny_transformer(family).config) for family in FAMILIES}


def recorded() -> dict:
    return json.loads(DATA_FILE.read_text())


def main() -> None:
    data = {
        "comfyui": {"repository": COMFYUI_REPOSITORY, "commit": COMFYUI_COMMIT, "sources": SOURCES},
        "about": "LoRA stems ComfyUI applies to each family's tiny test model (1 double, 1 single block): "
                 "stem -> the diffusion_model weight it patches and that weight's [out, in] shape. "
                 "Written by tests/comfyui_lora_keys.py, which states the rules.",
        "families": {family: key_map_for(family, config) for family, config in tiny_transformer_configs().items()},
    }
    DATA_FILE.parent.mkdir(exist_ok=True)
    DATA_FILE.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()
