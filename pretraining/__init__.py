"""
Masked-autoencoder pretraining with Transformers' Trainer (`dasheng-pretrain`).

- `pretrain.py`: the command line, the trainer and the data it reads.
- `arguments.py`: Dasheng's flags beside Trainer's, and their checks (`DashengPretrainingParser`).
- `encoder_export.py`: the encoder exported as a ready-to-use Hub folder during and after a run.

May import: the Hub files, `audio`, and torch, transformers and the `train` extra.
"""
