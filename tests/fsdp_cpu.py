"""Run train.py under Accelerate's FSDP plugin on CPU processes over gloo (for tests).

    ACCELERATE_USE_CPU=1 ACCELERATE_USE_FSDP=true FSDP_VERSION=2 ... \\
        torchrun --nproc_per_node 2 tests/fsdp_cpu.py <train.py overrides>

Accelerate 1.15 applies an FSDP plugin only on accelerator devices: on CPU processes
(DistributedType.MULTI_CPU) it silently ignores the plugin and wraps the model in DDP. This
flips that one decision, with what Accelerate's device branch does there (derive the plugin's
mixed precision policy from mixed_precision unless it has one); from there on the run takes
Accelerate's own FSDP2 code path
(fully_shard per Block, sharded optimizer, DCP sharded save/load, full state dict gather).
"""
import os
import runpy
import sys
from pathlib import Path

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

def allow_fsdp_on_cpu() -> None:
    """From here on, an Accelerator built under an FSDP launch on CPU processes takes
    Accelerate's FSDP path (tests/fsdp_reduce_cpu.py builds its own; main() runs train.py)."""
    accelerator_state_init = AcceleratorState.__init__

    def init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
        accelerator_state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            if self._mixed_precision != "no":  # as the accelerator-device branch does
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            self.distributed_type = DistributedType.FSDP
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = init_with_fsdp_on_cpu


def exit_skipping_teardown(status: int) -> None:
    """Skip the interpreter's teardown: in 2 of ~20 test runs here, a CPU-FSDP2 rank that had
    finished (checkpoint written, process group destroyed by end_training) aborted there with
    "terminate called without an active exception" (a C++ thread destroyed while joinable)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def main() -> None:
    allow_fsdp_on_cpu()
    train_py = Path(__file__).resolve().parents[1] / "train.py"
    sys.path.insert(0, str(train_py.parent))
    sys.argv = [str(train_py), *sys.argv[1:]]
    try:
        runpy.run_path(str(train_py), run_name="__main__")
        status = 0
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else int(e.code is not None)
    exit_skipping_teardown(status)


if __name__ == "__main__":
    main()
