"""Shared fixtures: tiny HF checkpoints and tokenizers (see hf_fixtures.py)."""
from hf_fixtures import bpe_json_path, hf_family, hf_llama, spm_model_path  # noqa: F401
