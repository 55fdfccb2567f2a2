"""Base-model handling: the model families (families/), loading diffusers-layout directories of any
of them, and writing tiny test models."""
