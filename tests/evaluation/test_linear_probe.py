"""The ESC-50 protocol script on real spoken digits (FSDD arranged in the ESC-50 layout) with random-weight encoders."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from dasheng_hf import DashengConfig, DashengModel
from dasheng_hf.audio.datasets import decode_audio
from dasheng_hf.evaluation import embeddings as probe_embeddings
from dasheng_hf.evaluation import linear_probe
from dasheng_hf.evaluation.embeddings import LinearProbeError
from dasheng_hf.evaluation.heads import knn_predict
from dasheng_hf.evaluation.linear_probe import load_audio_clips, main
from helpers import fsdd_files

REPO = Path(__file__).resolve().parents[2]
DIGITS = "zero one two three four five six seven eight nine".split()
TAKES = range(10)  # 10 digits x 2 speakers x 10 takes = 200 clips, 40 per fold (fold = take % 5 + 1)


def make_esc50_layout(root: Path, takes=TAKES) -> Path:
    """FSDD recordings (8 kHz) as an ESC-50 release folder: audio/ links and meta/esc50.csv, folds by take."""
    (root / "audio").mkdir(parents=True)
    (root / "meta").mkdir()
    rows = []
    for path in map(Path, fsdd_files()):
        digit, speaker, take = path.stem.split("_")
        if int(take) in takes:
            (root / "audio" / path.name).symlink_to(path.resolve())
            rows.append([path.name, int(take) % 5 + 1, int(digit), DIGITS[int(digit)], False, speaker, take])
    with (root / "meta" / "esc50.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["filename", "fold", "target", "category", "esc10", "src_file", "take"])
        writer.writerows(rows)
    return root


@pytest.fixture(scope="module")
def esc50_dir(tmp_path_factory) -> Path:
    return make_esc50_layout(tmp_path_factory.mktemp("fsdd") / "ESC-50-master")


@pytest.fixture(scope="module")
def dasheng_dir(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer base-width Dasheng saved like a checkpoint."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("dasheng-2-layers")
    DashengModel(DashengConfig(num_hidden_layers=2)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_dasheng_dir(tmp_path_factory) -> Path:
    """A randomly initialised 64-wide 2-layer Dasheng: cheap to fine-tune on a CPU."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-dasheng")
    DashengModel(DashengConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("embedding-cache")


def read_metrics(output_dir: Path) -> dict:
    return json.loads((output_dir / "metrics.json").read_text())


def test_local_folder_is_read_with_labels_folds_and_16k_audio(esc50_dir):
    clips = load_audio_clips(str(esc50_dir))
    assert len(clips) == 200
    assert clips.label_names == DIGITS
    assert sorted(np.unique(clips.folds)) == [1, 2, 3, 4, 5]
    assert np.bincount(clips.folds).tolist() == [0, 40, 40, 40, 40, 40]
    with (esc50_dir / "meta" / "esc50.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert clips.labels.tolist() == [int(row["filename"].split("_")[0]) for row in rows]
    samples, rate = soundfile.read(esc50_dir / "audio" / rows[0]["filename"])
    assert rate == 8000
    waveform = clips.waveform(0)
    assert waveform.dtype == np.float32 and waveform.ndim == 1
    assert abs(len(waveform) - 2 * len(samples)) <= 2  # resampled 8 kHz -> 16 kHz


def test_five_fold_probe_writes_metrics_and_second_run_uses_cache(esc50_dir, dasheng_dir, cache_dir, tmp_path, capsys):
    arguments = ["--model", str(dasheng_dir), "--dataset", str(esc50_dir), "--cache-dir", str(cache_dir)]
    main([*arguments, "--output-dir", str(tmp_path / "first")])
    metrics = read_metrics(tmp_path / "first")
    assert metrics["method"] == "probe" and metrics["embeddings_from_cache"] is False
    assert list(metrics["fold_accuracies"]) == ["1", "2", "3", "4", "5"]
    accuracies = np.array(list(metrics["fold_accuracies"].values()))
    assert metrics["accuracy_mean"] == pytest.approx(accuracies.mean())
    assert metrics["accuracy_std"] == pytest.approx(accuracies.std())
    assert metrics["accuracy_mean"] >= 0.5, metrics  # chance is 0.1
    out = capsys.readouterr().out
    assert "accuracy " in out and "(mean of 5 folds)" in out  # the summary: each fold was printed as it came
    assert all(out.count(f"fold {fold}: accuracy {value:.4f}") == 1 for fold, value in zip(range(1, 6), accuracies))
    for fold in range(1, 6):
        history = json.loads((tmp_path / "first" / f"fold{fold}" / "log_history.json").read_text())
        epochs = [entry for entry in history if "eval_accuracy" in entry]
        assert len(epochs) == metrics["epochs"] and "loss" in history[0]
    with (tmp_path / "first" / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 200
    fold1 = [row for row in rows if row["fold"] == "1"]
    assert np.mean([row["label"] == row["prediction"] for row in fold1]) == pytest.approx(accuracies[0])

    def no_embedding(*args, **kwargs):
        raise AssertionError("the second run embedded the clips again instead of reading the cache")

    original = probe_embeddings.embed_clips
    probe_embeddings.embed_clips = no_embedding
    try:
        main([*arguments, "--output-dir", str(tmp_path / "second")])
    finally:
        probe_embeddings.embed_clips = original
    second = read_metrics(tmp_path / "second")
    assert second["embeddings_from_cache"] is True
    assert second["fold_accuracies"] == metrics["fold_accuracies"]  # seeded: the same result


def test_knn_reaches_well_above_chance(esc50_dir, dasheng_dir, cache_dir, tmp_path):
    output = tmp_path / "knn"
    main(["--model", str(dasheng_dir), "--dataset", str(esc50_dir), "--cache-dir", str(cache_dir)] + [
        "--output-dir", str(output), "--knn", "--folds", "1,3,5"
    ])  # fmt: skip
    metrics = read_metrics(output)
    assert metrics["method"] == "knn" and metrics["k"] == 10
    assert list(metrics["fold_accuracies"]) == ["1", "3", "5"]
    assert metrics["accuracy_mean"] >= 0.5, metrics


def test_knn_votes_by_majority_and_breaks_ties_by_summed_similarity():
    train = np.array([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0], [-1.0, 0.0]])
    labels = np.array([0, 0, 1, 1, 2])
    # Two neighbours of each class 0 and 1 are closest to both queries; the query decides the tie by similarity.
    queries = np.array([[1.0, 0.9], [0.9, 1.0], [5.0, 0.2]])
    assert knn_predict(train, labels, queries, k=4).tolist() == [0, 1, 0]
    # Majority wins over similarity: one very close class-2 clip against two farther class-0 clips.
    train = np.array([[-1.0, 0.01], [0.0, 1.0], [0.1, 1.0]])
    assert knn_predict(train, np.array([2, 0, 0]), np.array([[-1.0, 0.5]]), k=3).tolist() == [0]


def test_finetune_mode_trains_a_classifier_with_trainer(esc50_dir, tiny_dasheng_dir, tmp_path):
    output = tmp_path / "finetune"
    main(["--model", str(tiny_dasheng_dir), "--dataset", str(esc50_dir), "--output-dir", str(output)] + [
        "--mode", "finetune", "--freeze-encoder", "--folds", "1", "--epochs", "4", "--learning-rate", "5e-2"
    ])  # fmt: skip
    metrics = read_metrics(output)
    assert metrics["method"] == "finetune" and metrics["embeddings_from_cache"] is None
    assert metrics["accuracy_mean"] >= 0.5, metrics
    history = json.loads((output / "fold1" / "log_history.json").read_text())
    assert [entry["epoch"] for entry in history if "eval_accuracy" in entry] == [1, 2, 3, 4]


def test_finetune_mode_trains_end_to_end(esc50_dir, tiny_dasheng_dir, tmp_path):
    """The whole model trains (encoder not frozen) and learns well above chance (0.1) in a few epochs."""
    output = tmp_path / "finetune-all"
    main(["--model", str(tiny_dasheng_dir), "--dataset", str(esc50_dir), "--output-dir", str(output)] + [
        "--mode", "finetune", "--folds", "1", "--epochs", "3", "--learning-rate", "1e-3"
    ])  # fmt: skip
    metrics = read_metrics(output)
    assert metrics["method"] == "finetune" and metrics["accuracy_mean"] >= 0.3, metrics


def test_other_transformers_encoders_use_the_same_protocol(esc50_dir, cache_dir, tmp_path):
    from transformers import ASTConfig, ASTFeatureExtractor, ASTModel

    torch.manual_seed(0)
    folder = tmp_path / "tiny-ast"
    config = ASTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, max_length=128)
    ASTModel(config).save_pretrained(folder)
    ASTFeatureExtractor(max_length=128).save_pretrained(folder)
    output = tmp_path / "ast"
    main(["--model", str(folder), "--dataset", str(esc50_dir), "--cache-dir", str(cache_dir)] + [
        "--output-dir", str(output), "--folds", "2", "--knn"
    ])  # fmt: skip
    metrics = read_metrics(output)
    assert metrics["model"] == str(folder) and 0.0 <= metrics["accuracy_mean"] <= 1.0
    widths = {np.load(path)["embeddings"].shape for path in cache_dir.glob("*.npz")}
    assert (200, 32) in widths and (200, 768) in widths  # AST pooler_output next to Dasheng's mean


def test_two_processes_under_torchrun(esc50_dir, dasheng_dir, tmp_path):
    output = tmp_path / "ddp"
    with socket.socket() as probe:  # a free port, so parallel runs do not collide
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    command += ["-m", "dasheng_hf.evaluation.linear_probe", "--model", str(dasheng_dir), "--dataset", str(esc50_dir)]
    command += ["--output-dir", str(output), "--cache-dir", str(tmp_path / "cache"), "--folds", "1,2"]
    command += ["--batch-size", "40", "--epochs", "10"]  # 160 training clips: 2 steps per epoch on 2 processes
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = read_metrics(output)
    assert metrics["num_processes"] == 2
    assert metrics["accuracy_mean"] >= 0.5, metrics
    assert result.stdout.count("(mean of 2 folds)") == 1  # one summary, from the main process
    history = json.loads((output / "fold1" / "log_history.json").read_text())
    assert max(entry["step"] for entry in history) == 20  # the data was split between the processes
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1  # one rank wrote the cache, no leftovers
    assert not list((tmp_path / "cache").glob("*.tmp"))


def test_offline_readme_command_names_the_model_and_the_dataset_at_once(tmp_path, capsys, monkeypatch):
    """The README's first command offline: one error naming both Hub resources and what to pass instead."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    output = tmp_path / "runs" / "esc50-dasheng-base"
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "mispeech/dasheng-base", "--dataset", "ashraq/esc50", "--output-dir", str(output)])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert len(message.strip().splitlines()) == 1 and "Traceback" not in message
    assert "--model 'mispeech/dasheng-base'" in message and "--dataset 'ashraq/esc50'" in message
    assert "dasheng-convert" in message and "--dataset /path/to/ESC-50-master" in message
    assert not (tmp_path / "runs").exists()


def test_clear_errors_for_bad_inputs(esc50_dir, tiny_dasheng_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    model = ["--model", str(tiny_dasheng_dir)]
    with pytest.raises(SystemExit):
        main([*model, "--dataset", str(tmp_path / "empty"), "--output-dir", str(tmp_path / "out")])
    assert "ESC-50 release layout" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*model, "--dataset", str(esc50_dir), "--folds", "7", "--output-dir", str(tmp_path / "out")])
    assert "Folds [7] are not in" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path / "empty"), "--dataset", str(esc50_dir), "--output-dir", str(tmp_path / "o")])
    assert "Could not load the model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*model, "--dataset", str(esc50_dir), "--knn", "--mode", "finetune", "--output-dir", str(tmp_path / "o")])
    assert "--knn" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()  # no folder left by a failure


def run_notebook(env: dict[str, str], cwd: Path) -> list[dict]:
    """Execute the notebook in a kernel with `env`; the outputs of its code cells (an error stops it)."""
    nbclient = pytest.importorskip("nbclient")
    import nbformat

    notebook = nbformat.read(REPO / "notebooks" / "esc50_linear_probe.ipynb", as_version=4)
    env = {**env, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "module://matplotlib_inline.backend_inline"}
    previous = {key: os.environ.get(key) for key in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        client = nbclient.NotebookClient(
            notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
        )
        try:
            client.execute()
        except nbclient.exceptions.CellExecutionError:
            pass  # the error is in the outputs
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]


def test_notebook_runs_headless_and_draws_its_figures(esc50_dir, dasheng_dir, cache_dir, tmp_path):
    env = {
        "DASHENG_NOTEBOOK_MODEL": str(dasheng_dir),
        "DASHENG_NOTEBOOK_DATASET": str(esc50_dir),
        "DASHENG_NOTEBOOK_OUTPUT": str(tmp_path / "notebook-run"),
        "DASHENG_NOTEBOOK_CACHE": str(cache_dir),
    }
    outputs = run_notebook(env, tmp_path)
    assert not [output for output in outputs if output.get("output_type") == "error"]
    images = [output for output in outputs if "image/png" in output.get("data", {})]
    assert len(images) >= 4  # mel spectrogram, training curve, confusion matrix, 2-D projection of the embeddings
    streams = "".join(output.get("text", "") for output in outputs if output.get("output_type") == "stream")
    assert "ipywidgets" not in streams and "IProgress" not in streams
    assert read_metrics(tmp_path / "notebook-run")["accuracy_mean"] >= 0.5


def test_notebook_errors_name_its_own_settings(tmp_path):
    env = {"DASHENG_NOTEBOOK_DATASET": str(tmp_path / "no-such-esc50"), "DASHENG_NOTEBOOK_OUTPUT": str(tmp_path / "o")}
    (error,) = [output for output in run_notebook(env, tmp_path) if output.get("output_type") == "error"]
    assert "DASHENG_NOTEBOOK_DATASET" in error["evalue"] and "--dataset" not in error["evalue"]
    assert not [line for line in error["traceback"] if "labelled.py" in line]  # its own message, not the library's


# ------------------------------------------------------------------------------------ bad inputs (issue 10)


def small_esc50(root: Path, extra_rows=(), bom=False) -> Path:
    """40 FSDD clips in the ESC-50 layout (folds 1 and 2), plus `extra_rows` (filename, fold, target) of the test."""
    make_esc50_layout(root, takes=range(2))
    meta = root / "meta" / "esc50.csv"
    text = meta.read_text() + "".join(f"{name},{fold},{target},x,False,0,A\n" for name, fold, target in extra_rows)
    meta.write_text(text, encoding="utf-8-sig" if bom else "utf-8")
    return root


def fails(arguments: list[str], capsys) -> str:
    """Run the command, which must fail with one line on stderr and no traceback; return that line."""
    with pytest.raises(SystemExit) as exit_info:
        main(arguments)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    lines = [line for line in error.splitlines() if line.startswith("dasheng-linear-probe: error: ")]
    assert "Traceback" not in error and len(lines) == 1, error
    return lines[0]


def test_unusable_clips_are_skipped_named_counted_and_cached(tiny_dasheng_dir, tmp_path, caplog):
    root = tmp_path / "esc50"
    bad = {"garbage.wav": "unreadable", "empty.wav": "empty (0 bytes)", "header.wav": "no audio samples"}
    bad |= {"short.wav": "shorter than the 480", "nan.wav": "NaN"}
    small_esc50(root, [(name, 1 + index % 2, 3) for index, name in enumerate(bad)])
    (root / "audio" / "garbage.wav").write_bytes(os.urandom(4000))
    (root / "audio" / "empty.wav").write_bytes(b"")
    soundfile.write(root / "audio" / "header.wav", np.zeros((0, 1), dtype=np.float32), 16000)
    soundfile.write(root / "audio" / "short.wav", np.full(100, 0.1, dtype=np.float32), 8000)  # 200 samples at 16k
    soundfile.write(root / "audio" / "nan.wav", np.array([0.1, np.nan] * 2000, dtype=np.float32), 8000, "FLOAT")
    arguments = ["--model", str(tiny_dasheng_dir), "--dataset", str(root), "--cache-dir", str(tmp_path / "cache")]
    with caplog.at_level(logging.WARNING):
        main([*arguments, "--output-dir", str(tmp_path / "first"), "--knn"])
    metrics = read_metrics(tmp_path / "first")
    assert metrics["num_clips"] == 45 and metrics["num_skipped"] == 5
    reasons = [entry["reason"] for entry in metrics["skipped_clips"]]
    for (name, reason), text in zip(bad.items(), reasons):
        assert name in text and reason in text and "esc50.csv row" in text
        assert name in caplog.text
    with (tmp_path / "first" / "predictions.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 40  # only the clips that were evaluated
    main([*arguments, "--output-dir", str(tmp_path / "second"), "--knn"])
    second = read_metrics(tmp_path / "second")
    assert second["embeddings_from_cache"] and second["skipped_clips"] == metrics["skipped_clips"]
    assert second["fold_accuracies"] == metrics["fold_accuracies"]
    main([*arguments, "--output-dir", str(tmp_path / "finetune"), "--mode", "finetune", "--epochs", "1"])
    assert read_metrics(tmp_path / "finetune")["skipped_clips"] == metrics["skipped_clips"]


def test_csv_problems_name_the_row(tiny_dasheng_dir, tmp_path, capsys):
    arguments = ["--model", str(tiny_dasheng_dir), "--output-dir", str(tmp_path / "out"), "--knn"]
    root = small_esc50(tmp_path / "bom", bom=True)
    main([*arguments, "--dataset", str(root), "--cache-dir", str(tmp_path / "cache")])  # a BOM is fine
    assert read_metrics(tmp_path / "out")["num_clips"] == 40
    root = small_esc50(tmp_path / "not-int", [("extra.wav", "one", 3)])
    (root / "audio" / "extra.wav").symlink_to(fsdd_files()[0])
    assert "esc50.csv row 42 (extra.wav): fold 'one' is not an integer" in fails(
        [*arguments, "--dataset", str(root)], capsys
    )
    root = small_esc50(tmp_path / "twice", [("0_george_0.wav", 2, 0)])  # already listed in row 2, fold 1
    error = fails([*arguments, "--dataset", str(root)], capsys)
    assert "row 42 (0_george_0.wav): the file is listed twice (also" in error and "row 2 (0_george_0.wav)" in error
    root = small_esc50(tmp_path / "escape", [("../../secret.wav", 1, 3)])
    error = fails([*arguments, "--dataset", str(root)], capsys)
    assert "row 42 (../../secret.wav): the path leads outside" in error
    root = small_esc50(tmp_path / "absolute", [(str(Path(fsdd_files()[0]).resolve()), 1, 3)])
    assert "row 42" in fails([*arguments, "--dataset", str(root)], capsys)


def test_options_and_output_paths_are_checked_before_any_work(
    tiny_dasheng_dir, esc50_dir, tmp_path, capsys, monkeypatch
):
    def no_work(*args, **kwargs):
        raise AssertionError("the clips were read or embedded before the options were checked")

    monkeypatch.setattr(linear_probe, "load_audio_clips", no_work)
    monkeypatch.setattr(probe_embeddings, "embed_clips", no_work)
    arguments = ["--model", str(tiny_dasheng_dir), "--dataset", str(esc50_dir), "--output-dir", str(tmp_path / "o")]
    for flag, value in [("--embedding-batch-size", "0"), ("--epochs", "0"), ("--learning-rate", "-1")]:
        assert f"{flag} must be a positive number" in fails([*arguments, flag, value], capsys)
    (tmp_path / "file").write_text("not a folder")
    arguments = ["--model", str(tiny_dasheng_dir), "--dataset", str(esc50_dir)]
    assert "--output-dir" in fails([*arguments, "--output-dir", str(tmp_path / "file")], capsys)
    error = fails([*arguments, "--output-dir", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "file")], capsys)
    assert f"--cache-dir {tmp_path / 'file'} is a file" in error
    assert "cannot create" in fails([*arguments, "--output-dir", str(tmp_path / "file" / "sub")], capsys)


def test_a_missing_model_path_is_reported_as_a_missing_path(esc50_dir, tmp_path, capsys):
    for model in (str(tmp_path / "no-such-model"), "runs/some/model", "./model"):
        error = fails(["--model", model, "--dataset", str(esc50_dir), "--output-dir", str(tmp_path / "o")], capsys)
        assert f"--model {model!r} does not exist" in error and "repo" not in error.lower()


def test_damaged_or_mismatched_cache_says_how_to_clear_it(tiny_dasheng_dir, tmp_path, capsys):
    root = small_esc50(tmp_path / "esc50")
    cache = tmp_path / "cache"
    arguments = ["--model", str(tiny_dasheng_dir), "--dataset", str(root), "--cache-dir", str(cache), "--knn"]
    main([*arguments, "--output-dir", str(tmp_path / "o")])
    (path,) = cache.glob("*.npz")
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    error = fails([*arguments, "--output-dir", str(tmp_path / "o")], capsys)
    assert f"The embedding cache {path} is damaged" in error and f"rm {path}" in error
    with path.open("wb") as handle:  # readable, but another dataset's embeddings under this name
        np.savez(handle, embeddings=np.zeros((7, 64), np.float32), key=np.array("other"), skipped=np.array("{}"))
    error = fails([*arguments, "--output-dir", str(tmp_path / "o")], capsys)
    assert "does not match this model and dataset" in error and f"rm {path}" in error
    with path.open("wb") as handle:  # this data's key and clips, but embeddings of another width
        stored = np.load(io.BytesIO(good))
        wide = np.zeros((len(stored["embeddings"]), 32), np.float32)
        np.savez(handle, embeddings=wide, key=stored["key"], skipped=stored["skipped"])
    error = fails([*arguments, "--output-dir", str(tmp_path / "o")], capsys)
    assert "holds embeddings 32 wide, but the model gives 64" in error and f"rm {path}" in error
    path.unlink()
    main([*arguments, "--output-dir", str(tmp_path / "o")])
    assert path.read_bytes() == good  # cleared as told: embedded again, the same


def test_huge_samples_give_finite_embeddings_or_an_error_naming_the_file(tiny_dasheng_dir, tmp_path, capsys):
    root = small_esc50(tmp_path / "esc50", [("loud.wav", 2, 3)])
    soundfile.write(root / "audio" / "loud.wav", np.full(8000, 3e30, dtype=np.float32), 8000, "FLOAT")
    cache = tmp_path / "cache"
    arguments = ["--model", str(tiny_dasheng_dir), "--dataset", str(root), "--cache-dir", str(cache), "--knn"]
    try:
        main([*arguments, "--output-dir", str(tmp_path / "o")])
    except SystemExit as exit_info:  # the feature extractor refuses the clip: the error names it
        assert exit_info.code == 2 and "esc50.csv row 42 (loud.wav)" in capsys.readouterr().err
        assert not list(cache.glob("*.npz"))
    else:  # or encodes it exactly: then its embedding is finite
        (path,) = cache.glob("*.npz")
        assert np.isfinite(np.load(path)["embeddings"]).all()


def test_non_finite_embeddings_are_an_error_naming_the_file(tiny_dasheng_dir, tmp_path, capsys, monkeypatch):
    root = small_esc50(tmp_path / "esc50", [("marked.wav", 1, 3)])
    soundfile.write(root / "audio" / "marked.wav", np.full(8000, 0.125, dtype=np.float32), 8000)
    original = probe_embeddings._pooled_embeddings

    def nan_for_the_marked_clip(model, feature_extractor, waveforms, device, layer=None):
        pooled = original(model, feature_extractor, waveforms, device, layer)
        marked = torch.tensor([bool(np.isclose(np.median(waveform), 0.125, atol=1e-3)) for waveform in waveforms])
        return torch.where(marked[:, None], torch.nan, pooled)

    monkeypatch.setattr(probe_embeddings, "_pooled_embeddings", nan_for_the_marked_clip)
    arguments = ["--model", str(tiny_dasheng_dir), "--dataset", str(root), "--cache-dir", str(tmp_path / "cache")]
    error = fails([*arguments, "--output-dir", str(tmp_path / "o"), "--knn"], capsys)
    assert "esc50.csv row 42 (marked.wav): its embedding is not finite" in error
    assert not list((tmp_path / "cache").glob("*.npz"))  # nothing cached


def test_hub_datasets_decode_through_the_shared_loader(monkeypatch):
    """A Hub dataset's audio column (here a local `datasets.Dataset` in its place) is decoded like local files."""
    import datasets

    files = fsdd_files()[:6]
    table = {"audio": files, "fold": [1, 2, 1, 2, 1, 2], "target": [0, 1, 2, 0, 1, 2], "category": list("abcabc")}
    local = datasets.Dataset.from_dict(table).cast_column("audio", datasets.Audio())
    monkeypatch.setattr(datasets, "load_dataset", lambda source, split: local)
    clips = load_audio_clips("someone/esc50-like")
    assert clips.label_names == ["a", "b", "c"] and clips.folds.tolist() == table["fold"]
    assert np.array_equal(clips.waveform(4), decode_audio(files[4]))
    bad = local.remove_columns("fold").add_column("fold", ["1", "x", "1", "2", "1", "2"])
    monkeypatch.setattr(datasets, "load_dataset", lambda source, split: bad)
    with pytest.raises(LinearProbeError, match=r"\[1\].*fold 'x' is not an integer"):
        load_audio_clips("someone/esc50-like")
