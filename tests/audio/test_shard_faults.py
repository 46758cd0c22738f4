"""
dasheng-make-shards under fault injection: real child processes stopped by SIGINT, SIGTERM, SIGHUP and SIGKILL while
shards are renamed into place (and before, and while workers write), then the invariant checked (the old complete set
or the new complete set, never a mix; the message says which) and a second run on the same folder; and the reader and
writer agreeing on keys, prefixes, compressed tars and the folder lock.
"""

from __future__ import annotations

import gzip
import shutil
import signal
import subprocess
import tarfile
from pathlib import Path

import pytest
from dasheng_hf.audio.datasets import DashengAudioDataset, DashengAudioError
from dasheng_hf.audio.make_shards import MakeShardsError, main, make_shards
from dasheng_hf.jobs.lock import LOCK_NAME
from fault_injection import SIGNALS, start
from helpers import fsdd_files

MODULE = "dasheng_hf.audio.make_shards"


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict[str, Path]:
    """A file list of 23 recordings; the old set (shards of 3) and, for reference, the new one (shards of 5)."""
    root = tmp_path_factory.mktemp("sets")
    listing = root / "train.csv"
    listing.write_text("filename,digit\n" + "".join(f"{p},{Path(p).name[0]}\n" for p in fsdd_files()[::40][:23]))
    make_shards(listing, root / "old", shard_size=3, num_workers=1, progress=False)
    make_shards(listing, root / "new", shard_size=5, num_workers=1, progress=False)
    return {"list": listing, "old": root / "old", "new": root / "new"}


def contents(folder: Path) -> dict[str, list[tuple[str, bytes]]]:
    """Every file of a shard folder: shards by name with their members; anything else by name (must be nothing)."""
    found = {}
    for path in sorted(folder.iterdir()):
        if path.name.endswith(".tar"):
            with tarfile.open(path) as tar:
                found[path.name] = [(member.name, tar.extractfile(member).read()) for member in tar]
        else:
            found[path.name] = []
    return found


def command(sets: dict[str, Path], output: Path) -> list[str]:
    return [str(sets["list"]), str(output), "--shard_size", "5", "--num_workers", "2", "--overwrite"]


def test_interrupted_publication_leaves_the_old_or_the_new_complete_set(sets, tmp_path) -> None:
    old, new = contents(sets["old"]), contents(sets["new"])
    outcomes = []
    # (signal, fault point, to the whole process group): every signal 3 times during the renames, once before them,
    # and the catchable ones once while the pool's workers write (as a terminal's Ctrl-C or hangup reaches them).
    cases = [(name, "publishing", False) for name in SIGNALS for _ in range(3)]
    cases += [(name, "shards-written", False) for name in SIGNALS]
    cases += [(name, "writing", True) for name in ("SIGINT", "SIGTERM", "SIGHUP")]
    for number, (name, point, group) in enumerate(cases):
        output = tmp_path / f"run{number}"
        shutil.copytree(sets["old"], output)
        run = start(MODULE, command(sets, output), tmp_path / f"run{number}.log", point)
        status = run.stop_at(point, SIGNALS[name], group=group)
        text = run.text()
        assert "Traceback" not in text and "BrokenPipeError" not in text, text
        if name == "SIGKILL":
            assert status == -signal.SIGKILL
        else:
            assert status == 130, text
            last = text.strip().splitlines()[-1]
            assert last.startswith(f"dasheng-make-shards: interrupted ({name})"), last
        left = contents(output)
        if point == "publishing" and name != "SIGKILL":  # the renames finished before the signal took effect
            assert "holds the new complete set" in text and left == new
            outcome = "new set"
        elif point == "publishing":  # killed mid-rename: the journal says so, readers refuse, the next run finishes
            assert ".train.publish.json" in left
            with pytest.raises(DashengAudioError, match="stopped while publishing shards there"):
                DashengAudioDataset(str(output), crop_seconds=None)
            outcome = "journal"
        else:
            assert {key: value for key, value in left.items() if not key.endswith(".partial")} == {
                **old,
                **({LOCK_NAME: []} if name == "SIGKILL" else {}),
            }
            if name != "SIGKILL":
                assert "no new shard was published" in text and left == old
            outcome = "old set"
        outcomes.append((name, point, outcome))
        if outcome == "new set":
            continue  # nothing left for a second run to finish or clean (the SIGKILL and earlier cases check that)
        # The second run on the same folder: it finishes or cleans up what the first left, then writes the new set.
        second = start(MODULE, command(sets, output), tmp_path / f"second{number}.log")
        assert second.finish() == 0, second.text()
        if outcome == "journal":
            assert "finished publishing the 5 shards of an interrupted run" in second.text()
        if name == "SIGKILL" and point != "publishing":
            assert "partial shards left by an interrupted run" in second.text()
            assert "took over" in second.text()
        assert contents(output) == new
    assert len(outcomes) == 19


def test_keys_prefixes_and_seeds_that_would_misbehave_are_refused(sets, tmp_path, capsys) -> None:
    folder = tmp_path / "audio"
    folder.mkdir()
    for index, name in enumerate(["a.wav", "__meta__.wav", "__b.wav", "c.wav", "d.wav"]):
        shutil.copy(fsdd_files()[index], folder / name)
    for arguments, message in [
        ([str(folder), str(tmp_path / "o")], "starts with '__', which webdataset keeps for metadata"),
        ([str(sets["list"]), str(tmp_path / "o"), "--prefix", "../escape"], "must be a plain name"),
        ([str(sets["list"]), str(tmp_path / "o"), "--prefix", "/abs"], "must be a plain name"),
        ([str(sets["list"]), str(tmp_path / "o"), "--seed", "-1"], "--seed must be a whole number from 0"),
        ([str(sets["list"]), str(tmp_path / "file" / "o")], "is not a folder"),
    ]:
        (tmp_path / "file").write_text("x")
        with pytest.raises(SystemExit) as exit_info:
            main(arguments)
        error = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(error) == 1 and message in error[0], error
    assert sorted(path.name for path in tmp_path.iterdir()) == ["audio", "file"]  # nothing written, no folder left


def test_a_gzip_compressed_tar_and_all_keys_are_read(sets, tmp_path) -> None:
    pattern = make_shards(sets["list"], tmp_path / "plain", shard_size=100, num_workers=1, progress=False)
    plain = sorted(item["key"] for item in DashengAudioDataset(pattern, crop_seconds=None, shuffle=False))
    (tmp_path / "gz").mkdir()
    (tmp_path / "gz" / "train-000000.tar").write_bytes(gzip.compress(Path(pattern).read_bytes()))
    dataset = DashengAudioDataset(str(tmp_path / "gz"), crop_seconds=None, shuffle=False)
    assert sorted(item["key"] for item in dataset) == plain and len(plain) == 23 and dataset.num_skipped == 0


def test_one_run_per_output_folder(sets, tmp_path) -> None:
    output = tmp_path / "out"
    output.mkdir()
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        (output / LOCK_NAME).write_text(f'{{"pid": {sleeper.pid}, "host": "{_host()}", "command": "x"}}')
        with pytest.raises(MakeShardsError, match=f"in use by process {sleeper.pid}"):
            make_shards(sets["list"], output, shard_size=5, num_workers=1, progress=False)
    finally:
        sleeper.kill()
        sleeper.wait()
    (output / LOCK_NAME).write_text(f'{{"pid": {sleeper.pid}, "host": "{_host()}", "command": "x"}}')  # now dead
    make_shards(sets["list"], output, shard_size=5, num_workers=1, progress=False)
    assert contents(output) == contents(sets["new"])


def _host() -> str:
    import socket

    return socket.gethostname()
