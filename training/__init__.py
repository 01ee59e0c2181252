"""What train.py runs on: the config schema (config.py), how a run starts or resumes and
the run dir it holds (start.py), the Checkpointer (checkpointer.py), Accelerate and the stop
signals (runtime.py), the optimizer and its schedule (optim.py), and the distillation
teacher (distill.py)."""
