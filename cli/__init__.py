"""
What every command-line tool shares.

- `preflight.py`: checks before any work (Hub resources, all missing ones reported together and offline-aware; bf16
  instructions of the CPU) and an output folder that an early failure does not leave behind.

May import: the standard library, and huggingface_hub inside functions (so that `--help` stays fast). Never the Hub
files, torch or transformers at module level, nor a tool.
"""
