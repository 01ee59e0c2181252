"""The old spelling `python -m model.hf` kept as an alias: it runs `python -m store.hf` (the
spelling the docs teach). Imports nothing of the project itself."""
import runpy

if __name__ == "__main__":
    runpy.run_module("store.hf", run_name="__main__", alter_sys=True)
