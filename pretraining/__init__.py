"""
Masked-autoencoder pretraining with Transformers' Trainer (`dasheng-pretrain`).

- `pretrain.py`: the command line (`dasheng-pretrain`), light to import: `--help` before torch is imported.
- `trainer.py`: the model, the trainer, the data it reads, and the run (flags checked, folder locked, resume).
- `arguments.py`: Dasheng's own flags, their checks and the short `--help` (no torch, no transformers).
- `training_arguments.py`: Trainer's flags with the paper's recipe as defaults, and the parser (`--help-all`).
- `checkpoints.py`: which checkpoint `last` is (the newest complete one), and the check of every file a resume reads.
- `encoder_export.py`: the encoder exported as a ready-to-use Hub folder during and after a run.

May import: the Hub files, `audio`, `cli`, `jobs`, and torch, transformers and the `train` extra.
"""
