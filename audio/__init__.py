"""
The data layer every tool reads audio through.

- `decoding.py`: files or bytes to mono float32 at 16 kHz, resampling, cutting into crops.
- `sources.py`: folders, file lists, webdataset tar shards and `datasets` datasets, resolved into records.
- `datasets.py`: the torch datasets built on them (`DashengAudioClips`, `DashengAudioDataset`); tools import audio
  from here.
- `make_shards.py`: packing audio files into webdataset tar shards (`dasheng-make-shards`).

May import: torch, numpy and the audio libraries of the extras (soundfile, torchcodec, webdataset, datasets), the
Hub files, and `jobs` (locks and interrupts). Never a tool (`evaluation`, `pretraining`, `conversion`).
"""
