import math

from evaluation.speed import decode_tok_s
from model.config import ModelConfig
from model.kv_cache import kv_bytes_per_token
from model.transformer import Transformer


def test_decode_speed_is_measured_and_kv_bytes_follow_the_heads():
    cfg = ModelConfig(vocab_size=50, n_layer=2, n_head=8, n_kv_head=2, d_model=32,
                      max_seq_len=32)
    tok_s = decode_tok_s(Transformer(cfg), batch_size=8, context=16, new_tokens=4, repeats=1)
    assert math.isfinite(tok_s) and tok_s > 0
    assert kv_bytes_per_token(cfg) * 4 == kv_bytes_per_token(cfg.with_kv_heads(8))
