"""`dasheng-embed` on real speech (FSDD, and a long file made of FSDD clips) with a tiny perturbed-random Dasheng."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile
import torch
from dasheng_hf import DashengFeatureExtractor, DashengModel
from dasheng_hf.audio.datasets import decode_audio
from dasheng_hf.embedding.embed import main
from helpers import concatenated_fsdd, fsdd_files, hf_state_dict, make_reference_encoder, tiny_config

LONG_SECONDS = 200  # two segments of 161.28 s: the second starts mid-file
ARGUMENTS = ["--frames", "--layers", "all", "--clips-per-part", "3", "--num-workers", "1"]


@pytest.fixture(scope="module")
def reference():
    return make_reference_encoder(embed_dim=64, depth=2, num_heads=4, seed=5)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, reference) -> Path:
    model = DashengModel(tiny_config())
    model.load_state_dict(hf_state_dict(reference), strict=True)
    folder = tmp_path_factory.mktemp("tiny-dasheng")
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory) -> Path:
    """12 FSDD clips, one file that is no audio, and a 200 s file of FSDD speech (last in sorted order)."""
    folder = tmp_path_factory.mktemp("audio")
    for path in fsdd_files()[:: len(fsdd_files()) // 12][:12]:
        (folder / Path(path).name).symlink_to(path)
    (folder / "broken.wav").write_bytes(os.urandom(3000))
    soundfile.write(folder / "zz_long.wav", concatenated_fsdd(LONG_SECONDS * 16000).numpy(), 16000, "FLOAT")
    return folder


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, model_dir, audio_dir) -> Path:
    output = tmp_path_factory.mktemp("embedded") / "out"
    main([str(audio_dir), "--model", str(model_dir), "--output-dir", str(output), *ARGUMENTS])
    return output


def clip_table(output: Path) -> pd.DataFrame:
    return pd.read_parquet(output / "clips").sort_values("file", ignore_index=True)


def frame_table(output: Path) -> pd.DataFrame:
    return pd.read_parquet(output / "frames").sort_values(["file", "time"], ignore_index=True)


def assert_same_tables(first: pd.DataFrame, second: pd.DataFrame) -> None:
    assert list(first.columns) == list(second.columns) and len(first) == len(second)
    for column in first.columns:
        if first[column].dtype == object and isinstance(first[column][0], np.ndarray):
            np.testing.assert_array_equal(np.stack(first[column]), np.stack(second[column]), err_msg=column)
        else:
            assert first[column].tolist() == second[column].tolist(), column


def test_clip_frame_and_layer_outputs_equal_the_model_and_the_original(embedded, model_dir, audio_dir, reference):
    clips, frames = clip_table(embedded), frame_table(embedded)
    info = json.loads((embedded / "info.json").read_text())
    assert info["num_clips"] == 13 and info["num_skipped"] == 1 and "broken.wav" in info["skipped"][0]["file"]
    assert info["layers"] == [0, 1, 2] and info["frame_rate"] == 25 and len(info["weights_sha256"]) == 64
    model = DashengModel.from_pretrained(model_dir).eval()
    extractor = DashengFeatureExtractor.from_pretrained(model_dir)
    for row in clips.itertuples():
        waveform = decode_audio(row.file)
        assert row.duration == pytest.approx(len(waveform) / 16000)
        with torch.no_grad():
            outputs = model(**extractor(waveform, sampling_rate=16000, return_tensors="pt"), output_hidden_states=True)
            original = reference(torch.from_numpy(waveform)[None])
        tolerance = 1e-5 * (1 + float(outputs.last_hidden_state.abs().max()))
        np.testing.assert_allclose(row.embedding, outputs.pooler_output[0].numpy(), atol=tolerance)
        np.testing.assert_allclose(row.embedding, original[0].mean(0).numpy(), atol=1e-4)
        for layer in range(3):
            expected = outputs.hidden_states[layer][0].mean(0).numpy()
            np.testing.assert_allclose(getattr(row, f"layer_{layer}"), expected, atol=tolerance)
        mine = frames[frames.file == row.file]
        tokens = outputs.last_hidden_state[0].numpy()
        assert len(mine) == len(tokens)
        np.testing.assert_allclose(np.stack(mine.embedding), tokens, atol=tolerance)
        np.testing.assert_allclose(np.stack(mine.layer_1), outputs.hidden_states[1][0].numpy(), atol=tolerance)
        np.testing.assert_allclose(mine.time, 0.04 * np.arange(len(tokens)) + 0.015)
    assert clips.duration.max() == pytest.approx(LONG_SECONDS)
    assert len(frames[frames.file.str.endswith("zz_long.wav")]) == 25 * LONG_SECONDS


def test_parquet_reads_back_with_datasets(embedded):
    import datasets

    clips = datasets.load_dataset("parquet", data_files=str(embedded / "clips" / "*.parquet"), split="train")
    assert len(clips) == 13 and {"file", "key", "duration", "embedding", "layer_2"} <= set(clips.column_names)
    assert len(clips[0]["embedding"]) == 64
    frames = datasets.load_dataset("parquet", data_files=str(embedded / "frames" / "*.parquet"), split="train")
    assert len(frames) == len(frame_table(embedded))
    assert frames.column_names == ["file", "key", "time", "embedding", "layer_0", "layer_1", "layer_2"]
    # Frames join their clips on (file, key).
    assert set(zip(frames["file"], frames["key"])) == set(zip(clips["file"], clips["key"]))


def test_float16_storage_and_a_rerun_with_other_settings_is_refused(model_dir, audio_dir, embedded, tmp_path, capsys):
    output = tmp_path / "half"
    main([str(audio_dir), "--model", str(model_dir), "--output-dir", str(output), "--float16", "--num-workers", "0"])
    half, full = clip_table(output), clip_table(embedded)
    assert np.stack(half.embedding).dtype == np.float16
    np.testing.assert_allclose(np.stack(half.embedding), np.stack(full.embedding), rtol=2e-3, atol=2e-3)
    assert "layer_0" not in half.columns and not (output / "frames").exists()
    with pytest.raises(SystemExit) as exit_info:
        main([str(audio_dir), "--model", str(model_dir), "--output-dir", str(output), "--layers", "-1"])
    error = capsys.readouterr().err
    expected = "other settings (dtype: 'float16' there, 'float32' now; layers: None there, [2] now); resume with"
    assert exit_info.value.code == 2 and expected in error and "Traceback" not in error


def run_command(command: list[str], **kwargs) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def test_a_resumed_run_after_a_kill_equals_an_uninterrupted_one(model_dir, audio_dir, embedded, tmp_path):
    output = tmp_path / "killed"
    command = [sys.executable, "-m", "dasheng_hf.embedding.embed", str(audio_dir), "--model", str(model_dir)]
    command += ["--output-dir", str(output), *ARGUMENTS]
    process = run_command(command)
    deadline = time.monotonic() + 300
    while not list((output / "parts").glob("part-*.json")) and process.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)  # as soon as the first part is recorded
    process.communicate()
    assert not (output / "info.json").exists(), "the run ended before it could be killed"
    for path in [*output.glob("clips/*.parquet"), *output.glob("frames/*.parquet")]:
        pd.read_parquet(path)  # a file under its final name is whole
    resumed = run_command(command)
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr[-3000:]
    assert not list(output.rglob("*.partial-*"))
    assert_same_tables(clip_table(output), clip_table(embedded))
    assert_same_tables(frame_table(output), frame_table(embedded))
    assert "Embedded 10 clips" in stdout and "skipped 1" in stdout  # the first part's 3 were written before
    assert ": 13 clips (0.057 h of audio) in all, 1 of its 5 parts from an earlier run." in stdout


def test_two_processes_write_the_same_set_as_one(model_dir, audio_dir, embedded, tmp_path):
    output = tmp_path / "two"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    command += ["-m", "dasheng_hf.embedding.embed", str(audio_dir), "--model", str(model_dir)]
    command += ["--output-dir", str(output), *ARGUMENTS]
    stdout, stderr = (process := run_command(command)).communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    info, single = (json.loads((folder / "info.json").read_text()) for folder in (output, embedded))
    assert info["num_processes"] == 2 and info["clip_files"] == single["clip_files"]
    assert info["skipped"] == single["skipped"]
    assert_same_tables(clip_table(output), clip_table(embedded))
    assert_same_tables(frame_table(output), frame_table(embedded))
    assert stdout.count("Embedded 13 clips") == 1
    assert "Embedding (process 0's share, of 2)" in stderr  # the one bar counts rank 0's parts, and says so


def test_offline_hub_model_fails_at_once_and_leaves_no_folder(audio_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    output = tmp_path / "never"
    with pytest.raises(SystemExit) as exit_info:
        main([str(audio_dir), "--model", "nobody/no-such-model", "--output-dir", str(output)])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "nobody/no-such-model" in error and "dasheng-convert" in error
    assert not output.exists()


def test_tar_shards_and_datasets_sources_carry_their_labels(model_dir, tmp_path):
    """A webdataset shard (audio + .json per key) and a saved `datasets` dataset, embedded in one run."""
    import io
    import tarfile

    import datasets

    files = [Path(path) for path in fsdd_files()[:4]]
    shard = tmp_path / "shard-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for path in files[:2]:
            for name, data in ((f"{path.stem}.wav", path.read_bytes()), (f"{path.stem}.json", b'{"digit": 7}')):
                member = tarfile.TarInfo(name)
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    saved = tmp_path / "saved"
    words = "zero one two three four five six seven eight nine".split()
    features = datasets.Features(
        {
            "audio": datasets.Audio(),
            "digit": datasets.ClassLabel(names=words),
            "tags": datasets.Sequence(datasets.ClassLabel(names=["male", "speech"])),
        }
    )
    table = {
        "audio": [str(path) for path in files[2:]],
        "digit": [int(path.stem[0]) for path in files[2:]],
        "tags": [[1, 0], []],
    }
    datasets.Dataset.from_dict(table, features=features).save_to_disk(str(saved))
    output = tmp_path / "out"
    main([str(shard), str(saved), "--model", str(model_dir), "--output-dir", str(output), "--num-workers", "2"])
    clips = pd.read_parquet(output / "clips")
    assert clips.key.tolist() == [path.stem for path in files[:2]] + [path.name for path in files[2:]]
    # ClassLabel columns as their names, lists of them as lists of names (the shard's .json as it is)
    assert clips.digit.tolist() == ["7", "7", words[int(files[2].stem[0])], words[int(files[3].stem[0])]]
    assert [None if tags is None else list(tags) for tags in clips.tags] == [None, None, ["speech", "male"], []]
    model = DashengModel.from_pretrained(model_dir).eval()
    extractor = DashengFeatureExtractor.from_pretrained(model_dir)
    with torch.no_grad():
        expected = model(**extractor(decode_audio(files[0]), sampling_rate=16000, return_tensors="pt")).pooler_output
    np.testing.assert_allclose(clips.embedding[0], expected[0].numpy(), atol=1e-5)


def test_a_file_list_names_its_file_column_and_a_missing_one_is_one_line(model_dir, tmp_path, capsys):
    files = [Path(path) for path in fsdd_files()[:3]]
    listing = tmp_path / "list.csv"
    listing.write_text("path,digit\n" + "".join(f"{path},{path.stem[0]}\n" for path in files))
    output = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main([str(listing), "--model", str(model_dir), "--output-dir", str(output)])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "no 'filename' column" in error and "--file-column" in error
    assert len(error.strip().splitlines()) == 1 and not output.exists()
    main([str(listing), "--model", str(model_dir), "--output-dir", str(output), "--file-column", "path"])
    clips = pd.read_parquet(output / "clips")
    assert clips.file.tolist() == [str(path) for path in files] and clips.digit.tolist() == [p.stem[0] for p in files]
    assert "path" not in clips.columns


def test_a_rerun_of_a_finished_folder_does_nothing_and_says_so(model_dir, audio_dir, embedded, capsys):
    before = (embedded / "info.json").read_text()
    main([str(audio_dir), "--model", str(model_dir), "--output-dir", str(embedded), *ARGUMENTS])
    out = capsys.readouterr().out
    assert f"Nothing to do: {embedded} already holds all 5 parts, 13 clips" in out and "skipped 1" in out
    assert (embedded / "info.json").read_text() == before


def test_a_second_run_on_the_same_folder_is_refused(model_dir, audio_dir, tmp_path, capsys):
    import socket as sockets

    output = tmp_path / "busy"
    output.mkdir()
    with subprocess.Popen(["sleep", "60"]) as sleeper:
        owner = {"pid": sleeper.pid, "host": sockets.gethostname(), "command": "dasheng-embed", "token": "t"}
        (output / ".dasheng-run.lock").write_text(json.dumps({**owner, "started": "2026-12-05 10:00:00"}))
        with pytest.raises(SystemExit) as exit_info:
            main([str(audio_dir), "--model", str(model_dir), "--output-dir", str(output)])
        sleeper.kill()
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"in use by process {sleeper.pid}" in error and "Traceback" not in error
    assert sorted(path.name for path in output.iterdir()) == [".dasheng-run.lock"]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize(
    "signum, group", [(signal.SIGTERM, False), (signal.SIGINT, False), (signal.SIGINT, True), (signal.SIGTERM, True)]
)
def test_a_signal_mid_run_ends_with_one_line_and_the_same_command_resumes(
    model_dir, audio_dir, embedded, tmp_path, signum, group
):
    """SIGINT/SIGTERM to the main process alone or to its process group (Ctrl-C, a scheduler), with 2 workers."""
    from fault_injection import FaultRun

    output = tmp_path / "stopped"
    argv = [str(audio_dir), "--model", str(model_dir), "--output-dir", str(output), *ARGUMENTS[:-1], "2"]
    run = FaultRun("dasheng_hf.embedding.embed", argv, tmp_path / "log", "embed-part-written:2")
    pgid = run.process.pid  # the child made its own group
    status = run.stop_at("embed-part-written", signum, group=group)
    text = run.text()
    name = signal.Signals(signum).name
    assert status == 130 and f"dasheng-embed: interrupted ({name}); the parts written so far are kept" in text
    assert "Traceback" not in text and "Exception ignored" not in text and "Error" not in text, text[-3000:]
    deadline = time.monotonic() + 10
    while _group_alive(pgid) and time.monotonic() < deadline:  # the workers ended with the main process
        time.sleep(0.05)
    assert not _group_alive(pgid)
    assert len(list((output / "parts").glob("*.json"))) == 2 and not (output / "info.json").exists()
    assert not list(output.rglob("*.partial-*")) and not (output / ".dasheng-run.lock").exists()
    main(argv)
    assert_same_tables(clip_table(output), clip_table(embedded))
    assert_same_tables(frame_table(output), frame_table(embedded))


def test_a_worker_killed_mid_run_is_one_line(model_dir, audio_dir, tmp_path):
    from fault_injection import FaultRun

    output = tmp_path / "worker"
    argv = [str(audio_dir), "--model", str(model_dir), "--output-dir", str(output), *ARGUMENTS]
    # The main process waits 2 s at the fault point, then finds the worker gone when it asks for the next batch.
    run = FaultRun(
        "dasheng_hf.embedding.embed", argv, tmp_path / "log", "embed-part-written:1", DASHENG_FAULT_PAUSE="2"
    )
    assert run.wait_for("DASHENG_FAULT_POINT embed-part-written ")
    pid = run.process.pid
    workers = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    assert len(workers) == 1
    os.kill(int(workers[0]), signal.SIGKILL)  # as the kernel's out-of-memory killer would
    status = run.finish()
    text = run.text()
    assert status == 1 and "dasheng-embed: error: a decoding worker died (DataLoader worker" in text, text[-3000:]
    assert "--num-workers" in text and "Traceback" not in text
