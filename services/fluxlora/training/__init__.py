"""LoRA training: the torch loop (trainer/) and the service around it."""
