"""The tiny random model of each trainable family, by family name (`fluxlora models write-tiny --family`)."""

from __future__ import annotations

from pathlib import Path

from fluxlora.models.families import FAMILIES


def write_tiny_family(family: str, out_dir: Path, seed: int = 0) -> Path:
    """Write `family`'s tiny model to out_dir; ValueError for a family without one yet."""
    if family == "flux1-dev":
        from fluxlora.models.tiny_flux import write_tiny_flux

        # FLUX.1 [dev]'s distilled guidance input, so the family's guidance path is exercised.
        return write_tiny_flux(out_dir, seed=seed, guidance_embeds=True)
    if family == "chroma":
        from fluxlora.models.tiny_chroma import write_tiny_chroma

        return write_tiny_chroma(out_dir, seed=seed)
    if family == "flux2-klein":
        from fluxlora.models.tiny_flux2 import write_tiny_flux2_klein

        return write_tiny_flux2_klein(out_dir, seed=seed)
    if family == "flux2-dev":
        from fluxlora.models.tiny_flux2 import write_tiny_flux2_dev

        return write_tiny_flux2_dev(out_dir, seed=seed)
    if family == "flux1-kontext":
        from fluxlora.models.tiny_kontext import write_tiny_kontext

        return write_tiny_kontext(out_dir, seed=seed)
    raise ValueError(f"no tiny model for family {family!r} yet: use one of {', '.join(FAMILIES)}")
