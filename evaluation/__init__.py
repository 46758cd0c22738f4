"""
Evaluating audio encoders on labelled data (`dasheng-eval` and its ESC-50 preset) and serving Dasheng's embeddings to
benchmark harnesses.

- `evaluate.py`: the `dasheng-eval` command line.
- `linear_probe.py`: the ESC-50 preset and its command line (`dasheng-linear-probe`).
- `labelled.py`: labelled datasets in every layout (class folders, CSV/TSV, `datasets`, `dasheng-embed` output,
  ESC-50) as labelled clips, single- or multi-label, with folds or splits.
- `protocol.py`: the protocol (folds, given splits, stratified split), one head per split, the metrics.
- `embeddings.py`: labelled clips, loading any audio encoder, embedding clips and the on-disk embedding cache.
- `heads.py`: the heads trained or fitted on embeddings (k-NN, linear, MLP) and fine-tuning with Trainer.
- `reports.py`: accuracy, average precision, mAP, AUC and d-prime; predictions, confusion matrix, per-class AP.
- `hear.py`: the HEAR 2021 API (`python -m heareval.embeddings.runner dasheng_hf.evaluation.hear`).
- `xares.py`: the X-ARES / xares-llm encoder.

May import: the Hub files, `audio`, `cli`, `embedding` (to read `dasheng-embed` output), and torch, transformers and
the `examples` extra.
"""
