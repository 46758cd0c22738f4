"""Shared audio loading: decoding, resampling, crops, sources, and splitting over processes and workers (FSDD)."""

from __future__ import annotations

import collections
import io
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import textwrap
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from dasheng_hf.audio.datasets import (
    DashengAudioClips,
    DashengAudioDataset,
    DashengAudioError,
    crop_audio,
    decode_audio,
    expand_pattern,
    read_file_list,
    resample,
)
from helpers import fsdd_files, load_wav

CROP = 0.5  # seconds: FSDD clips (0.3 to 1.5 s) give 1 to 3 crops each, some shorter than one (padded)
NUM_FILES, PER_SHARD = 40, 5


def expected_crops(paths, crop_seconds=CROP) -> dict[tuple[str, int], tuple[np.ndarray, int]]:
    crops = {}
    for path in paths:
        audio = decode_audio(path)
        for crop, num_samples, offset in crop_audio(audio, round(crop_seconds * 16000)):
            crops[Path(path).stem, offset] = crop, num_samples
    return crops


def write_shards(folder: Path, paths, per_shard=PER_SHARD) -> str:
    """Shards as the original's wavlist_to_tar writes them (webdataset's TarWriter, raw bytes, a json per sample)."""
    import webdataset

    folder.mkdir(parents=True, exist_ok=True)
    for shard in range(0, len(paths), per_shard):
        with webdataset.TarWriter(str(folder / f"train-{shard // per_shard:06d}.tar"), encoder=False) as writer:
            for path in paths[shard : shard + per_shard]:
                digit, speaker, take = Path(path).stem.split("_")
                labels = json.dumps({"digit": int(digit), "speaker": speaker}).encode()
                writer.write({"__key__": Path(path).stem, "wav": Path(path).read_bytes(), "json": labels})
    return str(folder / f"train-{{000000..{(len(paths) - 1) // per_shard:06d}}}.tar")


@pytest.fixture(scope="module")
def paths():
    return fsdd_files()[::25][:NUM_FILES]


@pytest.fixture(scope="module")
def shards(tmp_path_factory, paths) -> str:
    return write_shards(tmp_path_factory.mktemp("shards"), paths)


def read_all(dataset, world_size=1, num_workers=0, monkeypatch=None) -> list[list[dict]]:
    """Every process's items (one list per rank), reading through a DataLoader with `num_workers`."""
    per_rank = []
    for rank in range(world_size):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world_size))
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers)
        per_rank.append(list(loader))
    return per_rank


def crop_ids(items) -> list[tuple[str, int]]:
    return [(Path(item["key"]).stem, int(item["offset"])) for item in items]


# ---------------------------------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("rates", [(8000, 16000), (44100, 16000), (22050, 16000), (48000, 16000), (16000, 8000)])
def test_resample_equals_torchaudio(rates):
    torchaudio = pytest.importorskip("torchaudio")
    waveform = torch.randn(2, 12345, dtype=torch.float64)
    expected = torchaudio.functional.resample(waveform, *rates)
    ours = resample(waveform.float(), *rates)
    assert ours.shape == expected.shape == (2, int(np.ceil(12345 * rates[1] / rates[0])))
    assert float((ours.double() - expected).abs().max()) < 1e-5
    assert np.allclose(resample(waveform[0].float().numpy(), *rates), ours[0].numpy(), atol=1e-6)


def test_decode_wav_mono_16k_and_stereo_mixdown(tmp_path):
    path = fsdd_files()[0]
    audio = decode_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert np.abs(audio - load_wav(path).numpy()).max() < 1e-5  # soundfile + torchaudio resampling
    left, _ = soundfile.read(path, dtype="float32")
    stereo = np.stack([left, -0.5 * left], axis=1)
    soundfile.write(tmp_path / "stereo.flac", stereo, 8000, subtype="PCM_24")
    assert np.abs(decode_audio(tmp_path / "stereo.flac") - 0.25 * audio).max() < 1e-4


def test_formats_soundfile_cannot_read_go_through_torchcodec(tmp_path):
    if shutil.which("ffmpeg") is None:
        pytest.fail("FFmpeg is needed (apt-get install ffmpeg), see the README")
    source, target = fsdd_files()[0], tmp_path / "clip.m4a"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-i", source, "-c:a", "aac", str(target)], check=True)
    with pytest.raises(soundfile.LibsndfileError):
        soundfile.read(target)
    audio, reference = decode_audio(target), decode_audio(source)
    assert abs(len(audio) - len(reference)) < 4096  # AAC adds priming samples
    assert decode_audio(target.read_bytes(), name="clip.m4a").shape == audio.shape


def test_bad_files_raise_errors_that_name_them(tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    soundfile.write(tmp_path / "header_only.wav", np.zeros((0, 1), dtype=np.float32), 16000)
    soundfile.write(tmp_path / "nan.wav", np.array([0.1, np.nan, 0.2] * 400, dtype=np.float32), 16000, "FLOAT")
    (tmp_path / "garbage.wav").write_bytes(os.urandom(2000))
    (tmp_path / "folder.wav").mkdir()
    cases = {
        "empty.wav": r"empty \(0 bytes\)",
        "header_only.wav": "no audio samples",
        "nan.wav": "NaN",
        "garbage.wav": "unreadable",
        "folder.wav": "not a regular file",
        "missing.wav": "does not exist",
    }
    for name, reason in cases.items():
        with pytest.raises(DashengAudioError, match=reason) as error:
            decode_audio(tmp_path / name)
        assert name in str(error.value)


def test_sequential_crops_drop_the_last_partial_one_and_pad_short_clips():
    audio = np.arange(25, dtype=np.float32)
    crops = list(crop_audio(audio, 10))
    assert [(offset, num) for _, num, offset in crops] == [(0, 10), (10, 10)]
    assert np.array_equal(crops[1][0], audio[10:20])
    assert len(list(crop_audio(audio[:20], 10))) == 2
    (padded, num_samples, offset), *rest = crop_audio(audio[:3], 10)
    assert not rest and num_samples == 3 and offset == 0
    assert padded.tolist() == [0, 1, 2] + [0] * 7


# ----------------------------------------------------------------------------------------------------- sources


def test_brace_patterns_and_globs(tmp_path):
    for index in range(12):
        (tmp_path / f"s-{index:06d}.tar").touch()
    assert [Path(p).name for p in expand_pattern(str(tmp_path / "s-{000009..000011}.tar"))] == [
        "s-000009.tar", "s-000010.tar", "s-000011.tar"
    ]  # fmt: skip
    assert len(expand_pattern(str(tmp_path / "s-{000000..000001}.tar"))) == 2
    assert len(expand_pattern(str(tmp_path / "s-00000{1,3}.tar"))) == 2
    assert len(expand_pattern(str(tmp_path / "*.tar"))) == 12
    with pytest.raises(DashengAudioError, match=r"1 of 13 files do not exist"):
        expand_pattern(str(tmp_path / "s-{000000..000012}.tar"))
    with pytest.raises(DashengAudioError, match="matches no files"):
        expand_pattern(str(tmp_path / "*.flac"))


def test_file_list_with_bom_labels_and_paths_that_must_stay_inside(tmp_path, paths):
    (tmp_path / "audio").mkdir()
    for path in paths[:3]:
        (tmp_path / "audio" / Path(path).name).symlink_to(path)
    names = [Path(path).name for path in paths[:3]]
    text = "filename\tdigit\n" + "".join(f"audio/{name}\t{name[0]}\n" for name in names)
    (tmp_path / "list.tsv").write_text(text, encoding="utf-8-sig")
    records = read_file_list(tmp_path / "list.tsv")
    assert [record.labels for record in records] == [{"digit": name[0]} for name in names]
    clips = DashengAudioClips(str(tmp_path / "list.tsv"))
    assert np.array_equal(clips[1]["audio"], decode_audio(paths[1]))
    (tmp_path / "escape.csv").write_text(f"filename,digit\naudio/{names[0]},1\n../outside.wav,2\n")
    with pytest.raises(DashengAudioError, match=r"escape.csv row 3 \(../outside.wav\): the path leads outside"):
        DashengAudioDataset(str(tmp_path / "escape.csv"))
    (tmp_path / "absolute.csv").write_text(f"filename\n{paths[0]}\n")
    assert read_file_list(tmp_path / "absolute.csv")[0].path == paths[0]
    with pytest.raises(DashengAudioError, match="absolute paths are not allowed"):
        read_file_list(tmp_path / "absolute.csv", allow_absolute=False)
    (tmp_path / "nofilename.csv").write_text("path,digit\na.wav,1\n")
    with pytest.raises(DashengAudioError, match="no 'filename' column"):
        DashengAudioClips(str(tmp_path / "nofilename.csv"))


def test_sources_that_match_nothing_fail_at_construction(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no audio here")
    for source, message in [
        (tmp_path / "empty", "no audio files"),
        (tmp_path / "missing-folder/", "no such file or folder"),
        (tmp_path / "shards-{000000..000003}.tar", "4 of 4 files do not exist"),
        (tmp_path / "*.tar", "matches no files"),
        (tmp_path / "list.csv", "no such file or folder"),
    ]:
        with pytest.raises(DashengAudioError, match=message):
            DashengAudioDataset(str(source))


def test_datasets_source_with_labels(tmp_path, paths):
    import datasets

    table = {"audio": paths[:4], "digit": [int(Path(path).name[0]) for path in paths[:4]]}
    dataset = datasets.Dataset.from_dict(table).cast_column("audio", datasets.Audio())
    dataset.save_to_disk(str(tmp_path / "saved"))
    for source in (dataset, str(tmp_path / "saved")):
        clips = DashengAudioClips(source)
        assert len(clips) == 4 and clips[2]["labels"] == {"digit": table["digit"][2]}
        assert np.array_equal(clips[2]["audio"], decode_audio(paths[2]))
    items = list(DashengAudioDataset(str(tmp_path / "saved"), crop_seconds=None, shuffle=False))
    assert [item["labels"]["digit"] for item in items] == table["digit"]
    with pytest.raises(DashengAudioError, match="no audio column 'sound'"):
        DashengAudioClips(dataset, audio_column="sound")


# ------------------------------------------------------------------------------------------------ iteration


def test_shards_yield_every_crop_once_with_labels_from_json(shards, paths):
    expected = expected_crops(paths)
    items = list(DashengAudioDataset(shards, crop_seconds=CROP, shuffle=False))
    assert sorted(crop_ids(items)) == sorted(expected)
    for item in items:
        crop, num_samples = expected[item["key"], item["offset"]]
        assert item["audio"].shape == (8000,) and item["num_samples"] == num_samples
        assert np.array_equal(item["audio"], crop)
        digit, speaker, _ = item["key"].split("_")
        assert item["labels"] == {"digit": int(digit), "speaker": speaker}
    assert any(item["num_samples"] < 8000 for item in items)  # short clips come zero-padded


@pytest.mark.parametrize(
    "source, world_size, num_workers",
    [("shards", 2, 2), ("shards", 3, 3), ("folder", 2, 2)],
    ids=["whole-shards", "every-nth-sample", "every-nth-crop"],
)
def test_processes_and_workers_split_without_duplicates_or_gaps(
    source, world_size, num_workers, shards, paths, tmp_path, monkeypatch
):
    if source == "folder":  # 3 files for 4 readers: crops are dealt out
        for path in paths[:3]:
            (tmp_path / Path(path).name).symlink_to(path)
        source, paths = str(tmp_path), paths[:3]
    else:  # 8 shards for 4 readers (whole shards) or for 9 (every 9th sample)
        source = shards
    dataset = DashengAudioDataset(source, crop_seconds=CROP, shuffle_buffer=16, seed=3)
    per_rank = read_all(dataset, world_size, num_workers, monkeypatch)
    everything = [crop for items in per_rank for crop in crop_ids(items)]
    assert sorted(everything) == sorted(expected_crops(paths))
    assert all(per_rank), "every process gets a share"
    again = read_all(dataset, world_size, num_workers, monkeypatch)
    assert [crop_ids(items) for items in again] == [crop_ids(items) for items in per_rank]  # deterministic
    dataset.set_epoch(1)
    reshuffled = read_all(dataset, world_size, num_workers, monkeypatch)
    assert [crop_ids(items) for items in reshuffled] != [crop_ids(items) for items in per_rank]
    assert sorted(c for items in reshuffled for c in crop_ids(items)) == sorted(everything)


def test_repeat_runs_epoch_after_epoch_in_a_new_order(paths, tmp_path):
    for path in paths[:4]:
        (tmp_path / Path(path).name).symlink_to(path)
    count = len(expected_crops(paths[:4]))
    dataset = DashengAudioDataset(str(tmp_path), crop_seconds=CROP, repeat=True)
    dataset.set_epoch(5)
    stream = crop_ids(islice(iter(dataset), 2 * count))
    assert sorted(stream[:count]) == sorted(stream[count:]) == sorted(expected_crops(paths[:4]))
    assert stream[:count] != stream[count:]
    once = DashengAudioDataset(str(tmp_path), crop_seconds=CROP)
    once.set_epoch(6)
    assert crop_ids(once) == stream[count:]


def test_a_reader_without_data_is_an_error_when_repeating(paths, tmp_path, monkeypatch):
    (tmp_path / "one.wav").symlink_to(paths[0])  # one file shorter than a crop: one crop for two processes
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DashengAudioError, match="Reader 1 of 2 got no audio"):
        next(iter(DashengAudioDataset(str(tmp_path), crop_seconds=2.0, repeat=True)))


def test_corrupt_files_and_damaged_shards_are_skipped_counted_and_named(paths, tmp_path, caplog):
    good = write_shards(tmp_path, paths[:10], per_shard=10)
    with tarfile.open(tmp_path / "bad-000000.tar", "w") as tar:
        for name, data in [
            ("garbage.wav", os.urandom(3000)),
            ("empty.flac", b""),
            ("labels_only.json", b"{}"),
            ("fine.wav", Path(paths[10]).read_bytes()),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    whole = Path(expand_pattern(good)[0]).read_bytes()
    (tmp_path / "bad-000001.tar").write_bytes(whole[: len(whole) // 2 + 100])  # truncated mid-way
    sources = [good, str(tmp_path / "bad-{000000..000001}.tar")]
    dataset = DashengAudioDataset(sources, crop_seconds=None, shuffle=False)
    with caplog.at_level(logging.WARNING):
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2)
        keys = collections.Counter(item["key"] for item in loader)
    assert dataset.num_skipped == 4  # garbage, empty, no audio, and the truncated shard (counted across workers)
    assert keys["fine"] == 1 and all(keys[Path(path).stem] >= 1 for path in paths[:10])
    assert 11 < keys.total() < 21  # the first half of the truncated shard is still read
    with caplog.at_level(logging.WARNING):
        list(DashengAudioDataset(sources, crop_seconds=None, shuffle=False))
    for name in ("bad-000000.tar:garbage", "bad-000000.tar:empty", "bad-000000.tar:labels_only", "bad-000001.tar"):
        assert name in caplog.text


TRAINER_SCRIPT = """
import json, os, sys
import torch
from torch.utils.data import DataLoader
from transformers import Trainer, TrainingArguments
from dasheng_hf.audio.datasets import DashengAudioDataset, per_process_dataloader

class Recorder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))
        self.seen = []

    def forward(self, audio, num_samples, ids):
        self.seen += ids
        return {"loss": ((self.weight * audio.mean()) ** 2).sum()}

class PerProcessTrainer(Trainer):  # the recipe of the audio_data module docstring
    def get_train_dataloader(self):
        loader = DataLoader(self.train_dataset, batch_size=self._train_batch_size, collate_fn=self.data_collator,
                            num_workers=self.args.dataloader_num_workers)
        return per_process_dataloader(loader, self.args.device)

def collate(items):
    return {"audio": torch.stack([torch.from_numpy(item["audio"]) for item in items]),
            "num_samples": torch.tensor([item["num_samples"] for item in items]),
            "ids": [f"{item['key']}@{item['offset']}" for item in items]}

shards, output, max_steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
dataset = DashengAudioDataset(shards, crop_seconds=0.5, shuffle_buffer=16, seed=7, repeat=True)
args = TrainingArguments(output, max_steps=max_steps, per_device_train_batch_size=4, dataloader_num_workers=2,
                         use_cpu=True, report_to="none", save_strategy="no", logging_strategy="no",
                         remove_unused_columns=False, dataloader_pin_memory=False)
model = Recorder()
PerProcessTrainer(model=model, args=args, train_dataset=dataset, data_collator=collate).train()
with open(os.path.join(output, f"seen-{os.environ['RANK']}.json"), "w") as handle:
    json.dump(model.seen, handle)
"""


def test_trainer_on_two_processes_reads_each_share_once(shards, paths, tmp_path, monkeypatch):
    """Under torchrun (gloo), each process trains on exactly its own stream, and together they cover every crop."""
    everything = sorted(expected_crops(paths))
    steps = len(everything) // 4 + 2  # enough for each process to go through its share of the first epoch
    dataset = DashengAudioDataset(shards, crop_seconds=CROP, shuffle_buffer=16, seed=7, repeat=True)
    streams = []
    for rank in range(2):  # what each process should read: its share, batched by 2 workers, 4 crops per batch
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2, collate_fn=list)
        streams.append([crop for batch in islice(loader, steps) for crop in crop_ids(batch)])
    (tmp_path / "train.py").write_text(textwrap.dedent(TRAINER_SCRIPT))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    command += [str(tmp_path / "train.py"), shards, str(tmp_path), str(steps)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    seen = []
    for rank, stream in enumerate(streams):
        ids = json.loads((tmp_path / f"seen-{rank}.json").read_text())
        seen.append([(key, int(offset)) for key, offset in (item.rsplit("@", 1) for item in ids)])
        assert seen[rank] == stream  # this process read its own stream, in order, and nothing else
    assert set(seen[0]) | set(seen[1]) == set(everything)


def test_class_folders_label_each_file_with_its_folder(tmp_path):
    """Transformers' audiofolder convention: `dog/1.wav` is labelled `dog` (also under train/ and test/)."""
    from dasheng_hf.audio.sources import resolve_sources

    source = fsdd_files()[0]
    for relative in ("train/dog/a.wav", "train/cat/b.wav", "test/dog/c.wav"):
        (tmp_path / "classes" / relative).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(source, tmp_path / "classes" / relative)
    records = resolve_sources(str(tmp_path / "classes"), "audio", "train")
    assert {(r.key, r.labels["label"]) for r in records} == {
        ("train/dog/a.wav", "dog"),
        ("train/cat/b.wav", "cat"),
        ("test/dog/c.wav", "dog"),
    }
    (tmp_path / "classes" / "loose.wav").symlink_to(source)  # a file outside every class folder: no labels at all
    assert all(r.labels is None for r in resolve_sources(str(tmp_path / "classes"), "audio", "train"))
