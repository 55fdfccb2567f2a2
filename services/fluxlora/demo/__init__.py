"""Self-contained demo material: synthetic photos drawn locally, nothing downloaded."""
