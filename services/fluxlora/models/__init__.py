"""Base-model handling: loading diffusers-layout FLUX.1 directories and writing tiny test ones."""
