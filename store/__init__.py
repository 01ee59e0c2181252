"""Where models live on disk: gqalab checkpoint dirs (safetensors + JSON), train.py run
dirs (their layout; training/ writes them), HF Llama / GPT-2 / GPT-NeoX dirs, quantized
dirs, the locks and atomic writes every output uses, and `open_source(path)`, the one way
every command opens whichever of these a path is."""
