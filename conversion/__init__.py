"""
Converting original Dasheng checkpoints into Hub folders; the entry point is `convert_checkpoint.py` at the root
(`dasheng-convert`).

- `checkpoint_files.py`: finding, downloading and safely reading the input files (no code-carrying pickles).
- `checkpoint_contents.py`: splitting the state dict, deriving the config, checking tensors.
- `model_card.py`: the README.md of a converted folder.
- `output_folder.py`: checking the output folder and claiming it in one step.

May import: the Hub files, torch, transformers and safetensors.
"""
