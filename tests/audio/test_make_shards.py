"""make_shards: FSDD recordings packed into webdataset tar shards, read back, and bad inputs or interruptions."""

from __future__ import annotations

import json
import os
import signal
import tarfile
from pathlib import Path

import pytest
from dasheng_hf.audio import make_shards as make_shards_module
from dasheng_hf.audio.datasets import DashengAudioDataset, expand_pattern
from dasheng_hf.audio.make_shards import main, make_shards
from helpers import fsdd_files

NUM_FILES = 23


@pytest.fixture
def file_list(tmp_path) -> Path:
    """A TSV of 23 FSDD recordings (linked under audio/), with digit and speaker columns."""
    (tmp_path / "data" / "audio").mkdir(parents=True)
    lines = ["filename\tdigit\tspeaker"]
    for path in map(Path, fsdd_files()[::40][:NUM_FILES]):
        (tmp_path / "data" / "audio" / path.name).symlink_to(path)
        digit, speaker, _ = path.stem.split("_")
        lines.append(f"audio/{path.name}\t{digit}\t{speaker}")
    (tmp_path / "data" / "train.tsv").write_text("\n".join(lines) + "\n")
    return tmp_path / "data" / "train.tsv"


def read_shards(pattern: str) -> list[list[tuple[str, bytes]]]:
    shards = []
    for path in expand_pattern(pattern):
        with tarfile.open(path) as tar:
            shards.append([(member.name, tar.extractfile(member).read()) for member in tar])
    return shards


def test_file_list_round_trip(file_list, tmp_path, capsys):
    output = tmp_path / "shards"
    main([str(file_list), str(output), "--shard_size", "5", "--num_workers", "2"])
    pattern = capsys.readouterr().out.strip().splitlines()[-1]
    assert pattern == str(output / "train-{000000..000004}.tar")
    assert sorted(path.name for path in output.iterdir()) == [f"train-{index:06d}.tar" for index in range(5)]
    shards = read_shards(pattern)
    assert [len(members) for members in shards] == [10, 10, 10, 10, 6]  # audio + json per file
    members = dict(member for shard in shards for member in shard)
    keys = [name[: -len(".wav")] for shard in shards for name, _ in shard if name.endswith(".wav")]
    assert sorted(keys) == sorted(Path(line.split("\t")[0]).stem for line in file_list.read_text().split()[3::3])
    assert len(set(keys)) == NUM_FILES  # every file in exactly one shard
    input_order = [line.split("\t")[0] for line in file_list.read_text().splitlines()[1:]]
    assert keys != [Path(name).stem for name in input_order]  # shuffled
    for key in keys:
        assert members[f"{key}.wav"] == (file_list.parent / "audio" / f"{key}.wav").read_bytes()  # stored as-is
        digit, speaker, _ = key.split("_")
        assert json.loads(members[f"{key}.json"]) == {"digit": int(digit), "speaker": speaker}

    items = list(DashengAudioDataset(pattern, crop_seconds=None, shuffle=False))
    assert sorted(item["key"] for item in items) == sorted(keys)
    assert all(item["labels"]["digit"] == int(item["key"][0]) for item in items)

    webdataset = pytest.importorskip("webdataset")
    samples = list(webdataset.WebDataset(pattern, shardshuffle=False))
    assert sorted(sample["__key__"] for sample in samples) == sorted(keys) and "json" in samples[0]

    again = tmp_path / "again"
    make_shards(file_list, again, shard_size=5, num_workers=1, progress=False)
    assert read_shards(str(again / "train-{000000..000004}.tar")) == shards  # seeded: the same shards
    make_shards(file_list, tmp_path / "other-seed", shard_size=5, seed=1, progress=False)
    assert read_shards(str(tmp_path / "other-seed" / "train-{000000..000004}.tar")) != shards


def test_folder_input_dash_spelling_and_single_shard(file_list, tmp_path, capsys):
    main([str(file_list.parent / "audio"), str(tmp_path / "out"), "--shard-size", "100", "--prefix", "digits"])
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(tmp_path / "out" / "digits-000000.tar")
    (members,) = read_shards(str(tmp_path / "out" / "digits-000000.tar"))
    assert len(members) == NUM_FILES and all(name.endswith(".wav") for name, _ in members)  # no labels: no json


def fails_with(arguments: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(arguments)
    assert exit_info.value.code != 0
    error = capsys.readouterr().err
    lines = [line for line in error.split("\n") if line.strip() and not line.startswith(("Packing", "\r"))]
    assert "Traceback" not in error and len(lines) == 1 and lines[0].startswith("dasheng-make-shards: ")
    return lines[0]


def test_bad_inputs_are_named_before_anything_is_written(file_list, tmp_path, capsys):
    output = tmp_path / "shards"
    audio = file_list.parent / "audio"
    first, second = sorted(audio.iterdir())[:2]
    (audio / "sub").mkdir()
    (audio / "sub" / first.name).symlink_to(first.resolve())
    error = fails_with([str(audio), str(output)], capsys)
    assert "share the key" in error and str(first) in error and str(audio / "sub" / first.name) in error
    (audio / "sub" / first.name).unlink()

    text = file_list.read_text()
    (file_list.parent / "missing.tsv").write_text(text + "audio/nope.wav\t1\tx\nnotes.txt\t1\tx\n")
    (file_list.parent / "notes.txt").write_text("not audio")
    error = fails_with([str(file_list.parent / "missing.tsv"), str(output)], capsys)
    assert "2 of 25 files cannot be packed" in error and "nope.wav" in error and "notes.txt" in error
    (file_list.parent / "escape.tsv").write_text(text + "../../secret.wav\t1\tx\n")
    assert "leads outside" in fails_with([str(file_list.parent / "escape.tsv"), str(output)], capsys)
    assert "no such file list or folder" in fails_with([str(tmp_path / "nothing"), str(output)], capsys)
    assert not output.exists()
    output.write_text("a file")
    assert "is not a folder" in fails_with([str(file_list), str(output)], capsys)
    assert "at least 1" in fails_with([str(file_list), str(tmp_path / "o"), "--shard_size", "0"], capsys)


def test_existing_shards_are_kept_unless_overwrite(file_list, tmp_path, capsys):
    output = tmp_path / "shards"
    make_shards(file_list, output, shard_size=3, progress=False)
    assert len(list(output.glob("train-*.tar"))) == 8
    assert "already holds 8 shards" in fails_with([str(file_list), str(output)], capsys)
    main([str(file_list), str(output), "--shard_size", "10", "--overwrite"])
    assert sorted(path.name for path in output.iterdir()) == [f"train-{index:06d}.tar" for index in range(3)]


@pytest.mark.parametrize("interruption", ["ctrl-c", "sigterm", "file vanished"])
def test_an_interrupted_run_leaves_no_shard_behind(interruption, file_list, tmp_path, monkeypatch, capsys):
    write_shard = make_shards_module._write_shard
    calls = []

    def interrupted_on_the_third_shard(job):
        calls.append(job)
        if len(calls) == 3:
            if interruption == "ctrl-c":
                raise KeyboardInterrupt
            if interruption == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
            Path(job[1][-1][1]).unlink()  # a file removed after the check: reading it fails midway
        return write_shard(job)

    monkeypatch.setattr(make_shards_module, "_write_shard", interrupted_on_the_third_shard)
    output = tmp_path / "shards"
    error = fails_with([str(file_list), str(output), "--shard_size", "5", "--num_workers", "1"], capsys)
    assert "no new shard was published" in error or "No such file" in error
    assert len(calls) == 3 and not output.exists()  # neither complete nor partial shards, nor an empty folder
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_console_script_is_installed():
    import shutil
    import subprocess

    path = shutil.which("dasheng-make-shards")
    assert path, "dasheng-make-shards is not installed: run `pip install -e .`"
    result = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--shard_size" in result.stdout and "--shard-size" in result.stdout
