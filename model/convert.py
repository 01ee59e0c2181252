"""The old spelling `python -m model.convert` kept as an alias: it runs `python -m convert` (the
spelling the docs teach). Imports nothing of the project itself."""
import runpy

if __name__ == "__main__":
    runpy.run_module("convert", run_name="__main__", alter_sys=True)
