"""One FSDP2 backward on two CPU processes, to measure in which dtype gradients are summed
(tests/test_train_fsdp.py). Launched like train.py under FSDP:

    ACCELERATE_USE_CPU=1 accelerate launch --config_file configs/accelerate/fsdp.yaml \\
        --num_processes 2 tests/fsdp_reduce_cpu.py <fp32|compute> <out.json>

The Accelerator is train.py's (training/runtime.py's make_accelerator with bf16 and the given
fsdp_reduce_dtype); the model is one bias-free linear layer whose class is named Block, so the
launch file's wrap policy shards it as it shards train.py's blocks. With loss = sum of
outputs, rank r's weight gradient is every row = its input X[r] (exact in bf16), so the
gradient FSDP reduce-scatters is the mean of the two ranks' inputs, summed in the reduce dtype.
The main process writes the gathered gradient, (2, len(X[0])), to out.json.
"""
import json
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from fsdp_cpu import allow_fsdp_on_cpu, exit_skipping_teardown

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from training.runtime import make_accelerator  # noqa: E402

# Per column, a large and a small bf16 value whose sum bf16 cannot hold (fp32 can)
X = ([1.0, 1.0, 1.0, 256.0], [2.0 ** -9, 3 * 2.0 ** -9, -(2.0 ** -9), 0.125])


class Block(torch.nn.Linear):
    """The name configs/accelerate/fsdp.yaml's fsdp_transformer_layer_cls_to_wrap shards."""


def main(reduce: str, out: Path) -> None:
    allow_fsdp_on_cpu()
    cfg = OmegaConf.create({"mixed_precision": "bf16", "grad_accum": 1, "fsdp_reduce_dtype": reduce,
                            "logger": {"backend": "none"}})
    accelerator = make_accelerator(cfg, out.parent)
    model = torch.nn.Sequential(Block(len(X[0]), 2, bias=False))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    x = torch.tensor([X[accelerator.process_index]])
    accelerator.backward(model(x).float().sum())
    grad = model[0].weight.grad.full_tensor()  # the sharded fp32 gradient, gathered
    if accelerator.is_main_process:
        out.write_text(json.dumps({"dtype": str(grad.dtype), "grad": grad.tolist()}))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
    exit_skipping_teardown(0)
