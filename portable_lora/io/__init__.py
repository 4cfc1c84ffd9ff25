"""File input and output: strict safetensors reading and writing, atomic writes."""
