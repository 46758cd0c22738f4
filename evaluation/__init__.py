"""
Evaluating Dasheng's embeddings and serving them to benchmark harnesses.

- `linear_probe.py`: the ESC-50 protocol and its command line (`dasheng-linear-probe`).
- `embeddings.py`: labelled clips, loading any audio encoder, embedding clips and the on-disk embedding cache.
- `heads.py`: the classifiers trained or fitted on embeddings (linear, k-NN, fine-tuning).
- `hear.py`: the HEAR 2021 API (`python -m heareval.embeddings.runner dasheng_hf.evaluation.hear`).
- `xares.py`: the X-ARES / xares-llm encoder.

May import: the Hub files, `audio`, `cli`, and torch, transformers and the `examples` extra.
"""
