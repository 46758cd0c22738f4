"""`dasheng-embed` when sources and settings change between runs, and on inputs that cannot give any embedding."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import torch
from dasheng_hf.embedding.embed import main
from helpers import fsdd_files


def link_files(folder: Path, files: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for path in files:
        (folder / Path(path).name).symlink_to(path)
    return folder


def embed(capsys, *argv: str) -> tuple[int, str, str]:
    """Run the command in-process: (exit status, stdout, stderr)."""
    try:
        main(list(argv))
        status = 0
    except SystemExit as stop:
        status = stop.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def one_line(text: str) -> str:
    """The lines a person sees, progress bars aside."""
    lines = [line for line in text.replace("\r", "\n").splitlines() if line.strip() and "Embedding" not in line]
    assert len(lines) == 1, lines
    return lines[0]


def test_changed_sources_are_refused_and_the_same_ones_spelled_otherwise_are_not(tiny_dir, tmp_path, capsys):
    folder = link_files(tmp_path / "audio", fsdd_files()[:6])
    output = tmp_path / "out"
    common = ["--model", str(tiny_dir), "--output-dir", str(output), "--clips-per-part", "2", "--num-workers", "0"]
    assert embed(capsys, str(folder), *common)[0] == 0
    # The same folder as `audio/` and from another working directory, the model as `tiny/`: nothing to do.
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        status, out, _ = embed(capsys, "audio/", *common[:1], f"{tiny_dir}/", *common[2:])
    finally:
        os.chdir(cwd)
    assert status == 0 and "Nothing to do" in out
    # A file renamed: the part that held it no longer matches, even though the number of parts is the same.
    (folder / Path(fsdd_files()[0]).name).rename(folder / "zz.wav")
    status, _, err = embed(capsys, str(folder), *common)
    assert status == 2 and "the sources changed since its part 0 was written" in one_line(err)
    (folder / "zz.wav").rename(folder / Path(fsdd_files()[0]).name)
    # A file rewritten under its name (another recording's samples): its part is refused; the original back, it is not.
    rewritten = folder / Path(fsdd_files()[2]).name
    rewritten.unlink()
    shutil.copyfile(fsdd_files()[3], rewritten)
    status, _, err = embed(capsys, str(folder), *common)
    assert status == 2 and "the sources changed since its part 1 was written" in one_line(err)
    rewritten.unlink()
    rewritten.symlink_to(fsdd_files()[2])
    assert "Nothing to do" in embed(capsys, str(folder), *common)[1]
    # Another split of a datasets source is another setting.
    status, _, err = embed(capsys, str(folder), *common, "--split", "test")
    assert status == 2 and "split: 'train' there, 'test' now" in one_line(err)
    # A folder reached through a link is the same source.
    (tmp_path / "linked").symlink_to(folder)
    assert embed(capsys, str(tmp_path / "linked"), *common)[0] == 0


def test_sources_with_other_label_columns_give_one_table_in_either_order(tiny_dir, tmp_path, capsys):
    import datasets

    plain = link_files(tmp_path / "plain", fsdd_files()[:2])
    for path in fsdd_files()[2:4]:
        link_files(tmp_path / "classes" / Path(path).stem[0], [path])
    for order in ((plain, tmp_path / "classes"), (tmp_path / "classes", plain)):
        output = tmp_path / f"out-{order[0].name}"
        argv = [*map(str, order), "--model", str(tiny_dir), "--output-dir", str(output), "--clips-per-part", "2"]
        assert embed(capsys, *argv)[0] == 0
        table = datasets.load_dataset("parquet", data_files=str(output / "clips" / "*.parquet"), split="train")
        assert table.column_names == ["file", "key", "duration", "label", "embedding"]
        labels = dict(zip(map(os.path.basename, table["file"]), table["label"]))
        assert labels == {Path(p).name: (Path(p).stem[0] if i >= 2 else None) for i, p in enumerate(fsdd_files()[:4])}
        assert len(pd.read_parquet(output / "clips").columns) == 5


def test_a_label_column_of_single_labels_in_one_source_and_lists_in_another_holds_lists(tiny_dir, tmp_path, capsys):
    import datasets

    for path in fsdd_files()[:2]:
        link_files(tmp_path / "classes" / Path(path).stem[0], [path])
    saved = tmp_path / "saved"
    features = datasets.Features(
        {"audio": datasets.Audio(), "label": datasets.Sequence(datasets.ClassLabel(names=["a", "b"]))}
    )
    table = {"audio": fsdd_files()[2:4], "label": [[0, 1], [1]]}
    datasets.Dataset.from_dict(table, features=features).save_to_disk(str(saved))
    for clips_per_part in ("100", "2"):  # both in one part, and each source in parts of its own
        output = tmp_path / f"out-{clips_per_part}"
        argv = [str(tmp_path / "classes"), str(saved), "--model", str(tiny_dir), "--output-dir", str(output)]
        assert embed(capsys, *argv, "--clips-per-part", clips_per_part)[0] == 0
        clips = datasets.load_dataset("parquet", data_files=str(output / "clips" / "*.parquet"), split="train")
        digits = [[Path(path).stem[0]] for path in fsdd_files()[:2]]  # the class folders' single labels, as lists
        assert clips["label"] == [*digits, ["a", "b"], ["b"]]


def test_a_file_list_whose_paths_start_elsewhere_takes_audio_root(tiny_dir, tmp_path, capsys):
    files = fsdd_files()[:2]
    (tmp_path / "meta").mkdir()
    listing = tmp_path / "meta" / "list.csv"
    listing.write_text("filename,digit\n" + "".join(f"{Path(p).name},{Path(p).stem[0]}\n" for p in files))
    output = tmp_path / "out"
    status, _, err = embed(capsys, str(listing), "--model", str(tiny_dir), "--output-dir", str(output))
    line = one_line(err)  # every file is missing under meta/: nothing was embedded, and nothing is kept
    assert status == 2 and "none of the 2 clips could be used" in line and "0_george_0.wav" in line
    assert not output.exists()
    argv = [str(listing), "--model", str(tiny_dir), "--output-dir", str(tmp_path / "rooted")]
    status, out, _ = embed(capsys, *argv, "--audio-root", str(Path(files[0]).parent))
    assert status == 0 and "Embedded 2 clips" in out
    listing.write_text("filename\n../x.wav\n")
    status, _, err = embed(capsys, str(listing), "--model", str(tiny_dir), "--output-dir", str(tmp_path / "up"))
    assert status == 2 and "give absolute paths, or name the folder the paths start from (--audio-root)" in err


def test_a_device_that_is_not_there_is_one_line_before_anything_is_written(tiny_dir, tmp_path, capsys):
    folder = link_files(tmp_path / "audio", fsdd_files()[:1])
    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU (cuda:0 on a machine without one)
    for device, message in ((missing, "CUDA GPU(s); pass --device cpu"), ("toaster", "is no device")):
        output = tmp_path / device
        argv = [str(folder), "--model", str(tiny_dir), "--output-dir", str(output), "--device", device]
        status, _, err = embed(capsys, *argv)
        assert status == 2 and message in one_line(err) and not output.exists()


def test_a_full_disk_is_one_line_and_leaves_no_partial_file(tiny_dir, tmp_path, capsys, monkeypatch):
    from dasheng_hf.embedding import store

    folder = link_files(tmp_path / "audio", fsdd_files()[:3])
    output = tmp_path / "out"

    def no_space(table, where, **kwargs):
        Path(where).write_bytes(b"PAR1")  # a partial file, as a write cut short leaves
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(where))

    monkeypatch.setattr("pyarrow.parquet.write_table", no_space)
    status, _, err = embed(capsys, str(folder), "--model", str(tiny_dir), "--output-dir", str(output))
    line = one_line(err)
    assert status == 1 and "cannot write" in line and "No space left on device" in line and "resumes" in line
    assert not list(output.rglob("*.partial-*")) and not (output / ".dasheng-run.lock").exists()
    assert store.done_parts(output) == set()
    monkeypatch.undo()
    status, out, _ = embed(capsys, str(folder), "--model", str(tiny_dir), "--output-dir", str(output))
    assert status == 0 and "Embedded 3 clips" in out
    assert json.loads((output / "info.json").read_text())["num_clips"] == 3


def test_a_folder_written_by_the_previous_version_resumes_with_a_warning(tiny_dir, tmp_path, capsys):
    """Before: settings held paths as typed and no file-list settings, part records no `sources`, frames no `key`."""
    folder = link_files(tmp_path / "audio", fsdd_files()[:4])
    output = tmp_path / "out"
    common = ["--model", str(tiny_dir), "--output-dir", str(output), "--clips-per-part", "2", "--frames"]
    assert embed(capsys, str(folder), *common)[0] == 0
    old_frames = output / "frames" / "part-00000.parquet"
    pq.write_table(pq.read_table(old_frames).drop_columns(["key"]), old_frames)
    settings = json.loads((output / "settings.json").read_text())
    for key in ("file_column", "audio_root", "audio_column", "split"):
        del settings[key]
    settings["sources"] = ["audio"]  # as typed in tmp_path
    (output / "settings.json").write_text(json.dumps(settings))
    for record_path in (output / "parts").glob("*.json"):
        record = json.loads(record_path.read_text())
        del record["sources"]
        record_path.write_text(json.dumps(record))
    (output / "parts" / "part-00001.json").unlink()  # interrupted before its second part was recorded
    (output / "info.json").unlink()
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        status, out, err = embed(capsys, "audio", *common)
    finally:
        os.chdir(cwd)
    assert status == 0 and "Embedded 2 clips" in out
    assert "1 written part(s) of" in err and "cannot be checked against the sources" in err
    # One frames table: the old part's rows have no key, the new part's have their clips' keys.
    frames = pd.read_parquet(output / "frames")
    assert list(frames.columns) == ["file", "key", "time", "embedding"]
    first, second = (pd.read_parquet(output / "clips" / f"part-0000{n}.parquet") for n in (0, 1))
    assert set(frames.file[frames.key.isna()]) == set(first.file)
    keyed = frames[frames.key.notna()]
    assert set(zip(keyed.file, keyed.key)) == set(zip(second.file, second.key))


def test_a_file_that_fails_in_an_unforeseen_way_is_skipped_and_named_not_the_run(
    tiny_dir, tmp_path, capsys, monkeypatch
):
    from dasheng_hf.audio.sources import AudioRecord

    folder = link_files(tmp_path / "audio", fsdd_files()[:3])
    doomed = Path(fsdd_files()[1]).name
    decode = AudioRecord.decode

    def failing(record, *args, **kwargs):
        if record.origin.endswith(doomed):
            raise MemoryError("cannot allocate 40 GiB")
        return decode(record, *args, **kwargs)

    monkeypatch.setattr(AudioRecord, "decode", failing)  # the worker (forked) has it too
    output = tmp_path / "out"
    argv = [str(folder), "--model", str(tiny_dir), "--output-dir", str(output), "--num-workers", "1"]
    status, out, _ = embed(capsys, *argv)
    assert status == 0 and "Embedded 2 clips" in out and "skipped 1" in out
    (skipped,) = json.loads((output / "info.json").read_text())["skipped"]
    assert skipped["file"].endswith(doomed) and skipped["reason"].endswith("MemoryError: cannot allocate 40 GiB")


def test_bad_flags_are_one_line_each(tiny_dir, tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    folder = link_files(tmp_path / "audio", fsdd_files()[:1])
    for flags, message in (
        (["--output-dir", str(tmp_path / "afile")], f"--output-dir {tmp_path / 'afile'} is a file; pass a folder."),
        (["--output-dir", str(tmp_path / "o"), "--clips-per-part", "0"], "--clips-per-part must be at least 1."),
        (["--output-dir", str(tmp_path / "o"), "--batch-seconds", "nan"], "--batch-seconds must be a positive number."),
    ):
        status, _, err = embed(capsys, str(folder), "--model", str(tiny_dir), *flags)
        assert status == 2 and one_line(err) == f"dasheng-embed: error: {message}"


def test_how_a_run_that_failed_ends():
    """The line and status for each way a run ends in an error (`embed._failure`)."""
    from dasheng_hf.embedding.embed import _failure

    kept = "the parts written so far are kept, and the same command resumes."
    worker = OSError(
        "Caught OSError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in <module>\nOSError: Could not load this library: libtorchcodec.so'
    )
    died = RuntimeError("DataLoader worker (pid(s) 4242) exited unexpectedly")
    assert _failure(worker, None) == (
        1,
        f"error: a decoding worker failed (OSError: Could not load this library: libtorchcodec.so); {kept}",
    )
    assert _failure(died, None)[0] == 1 and "if memory ran out, pass a smaller --num-workers" in _failure(died, None)[1]
    # SIGTERM to the process group also ends the workers; when their end is seen before the signal's own exception.
    assert _failure(died, "SIGTERM") == (130, f"interrupted (SIGTERM); {kept}")
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/out/clips/part-00000.parquet.partial-1")
    assert _failure(full, None) == (
        1,
        f"error: cannot write (/out/clips/part-00000.parquet.partial-1): No space left on device; {kept}",
    )
    assert _failure(KeyError("bug"), None) is None  # a bug keeps its traceback


def test_a_worker_meeting_a_closed_connection_prints_nothing(capfd):
    """The thread that shares a batch's memory with the main process reports through `sys.excepthook`."""
    from dasheng_hf.embedding.extract import _quiet_broken_connections

    for error in (BrokenPipeError(32, "Broken pipe"), ConnectionResetError(104, "Connection reset by peer")):
        _quiet_broken_connections(type(error), error, None)
    assert capfd.readouterr().err == ""
    _quiet_broken_connections(ValueError, ValueError("a real bug"), None)
    assert "ValueError: a real bug" in capfd.readouterr().err


def test_a_file_touched_since_is_refused_and_its_old_time_restored_is_not(tiny_dir, tmp_path, capsys):
    """Same size and content, another modification time (a file rewritten in place with the same bytes)."""
    folder = tmp_path / "audio"
    folder.mkdir()
    for path in fsdd_files()[:2]:
        shutil.copy2(path, folder)
    common = ["--model", str(tiny_dir), "--output-dir", str(tmp_path / "out"), "--num-workers", "0"]
    assert embed(capsys, str(folder), *common)[0] == 0
    touched = folder / Path(fsdd_files()[1]).name
    before = touched.stat()
    os.utime(touched, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    status, _, err = embed(capsys, str(folder), *common)
    assert status == 2 and "the sources changed since its part 0 was written" in one_line(err)
    os.utime(touched, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert "Nothing to do" in embed(capsys, str(folder), *common)[1]
