"""Bad files met by every tool: a WAV shorter than its header says is refused by name, and skipped files are counted
once each, however many epochs repeat them."""

from __future__ import annotations

import itertools
import shutil
import sys
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


def test_an_empty_file_is_named_as_empty(tmp_path) -> None:
    (tmp_path / "empty.wav").write_bytes(b"")
    for source in (tmp_path / "empty.wav", b""):
        with pytest.raises(DashengAudioError, match=r"empty \(0 bytes\)\.$"):
            decode_audio(source)


# torchcodec that does not load: built for another torch (OSError on import), or FFmpeg missing (torchcodec 0.17
# raises at the first decoder, with pages of tracebacks).
UNLOADABLE_TORCHCODEC = {
    "on import": "raise OSError('Could not load this library: libtorchcodec_core.so')\n",
    "at the first decoder": (
        "class AudioDecoder:\n"
        "    def __init__(self, source):\n"
        "        raise RuntimeError('Could not load libtorchcodec. Likely causes:\\n  1. FFmpeg is not installed.\\n"
        "[start of libtorchcodec loading traceback]\\n...')\n"
    ),
}


@pytest.mark.parametrize("when", sorted(UNLOADABLE_TORCHCODEC))
def test_a_torchcodec_that_does_not_load_is_one_line_reason_for_that_file(tmp_path, monkeypatch, when) -> None:
    """Files soundfile cannot read are refused with one line saying why and what to install; the files it can read
    still decode."""
    fake = tmp_path / "packages" / "torchcodec"
    fake.mkdir(parents=True)
    if when == "on import":
        (fake / "__init__.py").write_text(UNLOADABLE_TORCHCODEC[when])
    else:
        (fake / "__init__.py").write_text("")
        (fake / "decoders.py").write_text(UNLOADABLE_TORCHCODEC[when])
    for name in [name for name in sys.modules if name.split(".")[0] == "torchcodec"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path / "packages"))
    (tmp_path / "noise.wav").write_bytes(b"not audio at all" * 100)
    try:
        with pytest.raises(DashengAudioError) as raised:
            decode_audio(tmp_path / "noise.wav")
    finally:  # the fake goes (monkeypatch puts back the real modules it removed, but keeps what was added)
        for name in [name for name in sys.modules if name.split(".")[0] == "torchcodec"]:
            del sys.modules[name]
    message = str(raised.value)
    assert message.startswith(f"{tmp_path / 'noise.wav'}: soundfile cannot read it (LibsndfileError: ")
    cause = "OSError: Could not load this library" if when == "on import" else "RuntimeError: Could not load libtorch"
    assert f"torchcodec, which reads other formats, does not load ({cause}" in message
    assert "install FFmpeg (apt-get install ffmpeg), or the torchcodec release made for your torch" in message
    assert "\n" not in message
    assert len(decode_audio(fsdd_files()[0])) > 0
