"""
Embedding any audio with Dasheng at scale (`dasheng-embed`): clip, frame and layer embeddings as Parquet.

- `embed.py`: the command line (`dasheng-embed`, `python -m dasheng_hf.embedding.embed`), processes and resuming.
- `extract.py`: features in dataloader workers, long clips cut into segments, padding-free batches through the model.
- `store.py`: the output folder: Parquet parts written atomically, their completion records, `info.json`, reading.

May import: the Hub files, `audio`, `cli`, and torch, transformers, pyarrow and pandas (the `examples` extra).
"""
