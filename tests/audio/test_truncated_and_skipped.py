"""Bad files met by every tool: a WAV shorter than its header says is refused by name, and skipped files are counted
once each, however many epochs repeat them."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import pytest
from dasheng_hf.audio.datasets import DashengAudioClips, DashengAudioDataset, DashengAudioError, decode_audio
from helpers import fsdd_files


def test_a_wav_truncated_to_half_its_header_is_refused_by_name(tmp_path) -> None:
    data = Path(fsdd_files()[0]).read_bytes()
    (tmp_path / "half.wav").write_bytes(data[: len(data) // 2])
    for source in (tmp_path / "half.wav", data[: len(data) // 2]):
        with pytest.raises(DashengAudioError, match=r"truncated: its WAV header declares \d+ bytes .* \(50%\)"):
            decode_audio(source)
    with pytest.raises(DashengAudioError, match="half.wav: truncated"):
        DashengAudioClips(str(tmp_path))[0]
    assert len(decode_audio(data)) > 0  # the whole file still reads


def test_skipped_files_are_counted_once_each_over_many_epochs(tmp_path) -> None:
    for path in fsdd_files()[:6]:
        shutil.copy(path, tmp_path)
    for index in range(3):
        (tmp_path / f"bad{index}.wav").write_bytes(b"RIFF not really audio")
    dataset = DashengAudioDataset(str(tmp_path), crop_seconds=0.1, shuffle_buffer=4, repeat=True, seed=1)
    crops_per_epoch = sum(len(decode_audio(path)) // 1600 for path in fsdd_files()[:6])
    list(itertools.islice(iter(dataset), 3 * crops_per_epoch + 1))  # into the fourth epoch
    assert dataset.num_skipped == 3
    once = DashengAudioDataset(str(tmp_path), crop_seconds=None, shuffle=False)
    for _ in range(2):  # another pass over evaluation data counts afresh after a reset
        once.reset_skipped()
        assert len(list(once)) == 6 and once.num_skipped == 3
