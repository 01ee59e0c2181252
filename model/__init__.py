"""gqalab's model package: one decoder-only transformer whose attention is MHA, GQA or MQA
depending on a single number, n_kv_head."""
from model.config import ConfigError, ModelConfig
from model.kv_cache import KVCache
from model.transformer import Transformer

__all__ = ["ConfigError", "KVCache", "ModelConfig", "Transformer"]
