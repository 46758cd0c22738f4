"""The ESC-50 protocol script on real spoken digits (FSDD arranged in the ESC-50 layout) with random-weight encoders."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from dasheng_hf import DashengConfig, DashengModel, linear_probe
from dasheng_hf.linear_probe import knn_predict, load_audio_clips, main
from helpers import fsdd_files

REPO = Path(__file__).resolve().parents[1]
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
    assert "mean  " in capsys.readouterr().out  # the summary table
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

    original = linear_probe.embed_clips
    linear_probe.embed_clips = no_embedding
    try:
        main([*arguments, "--output-dir", str(tmp_path / "second")])
    finally:
        linear_probe.embed_clips = original
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


def test_finetune_mode_trains_a_classifier_with_trainer(esc50_dir, dasheng_dir, tmp_path):
    output = tmp_path / "finetune"
    main(["--model", str(dasheng_dir), "--dataset", str(esc50_dir), "--output-dir", str(output)] + [
        "--mode", "finetune", "--freeze-encoder", "--folds", "1", "--epochs", "4", "--learning-rate", "1e-2"
    ])  # fmt: skip
    metrics = read_metrics(output)
    assert metrics["method"] == "finetune" and metrics["embeddings_from_cache"] is None
    assert metrics["accuracy_mean"] >= 0.5, metrics
    history = json.loads((output / "fold1" / "log_history.json").read_text())
    assert [entry["epoch"] for entry in history if "eval_accuracy" in entry] == [1, 2, 3, 4]


def test_finetune_mode_trains_end_to_end(esc50_dir, dasheng_dir, tmp_path):
    """The whole model trains (encoder not frozen) and learns well above chance (0.1) in a few epochs."""
    output = tmp_path / "finetune-all"
    main(["--model", str(dasheng_dir), "--dataset", str(esc50_dir), "--output-dir", str(output)] + [
        "--mode", "finetune", "--folds", "1", "--epochs", "3", "--learning-rate", "3e-4"
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
    command += ["-m", "dasheng_hf.linear_probe", "--model", str(dasheng_dir), "--dataset", str(esc50_dir)]
    command += ["--output-dir", str(output), "--cache-dir", str(tmp_path / "cache"), "--folds", "1,2"]
    command += ["--batch-size", "40", "--epochs", "10"]  # 160 training clips: 2 steps per epoch on 2 processes
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = read_metrics(output)
    assert metrics["num_processes"] == 2
    assert metrics["accuracy_mean"] >= 0.5, metrics
    assert result.stdout.count("fold  accuracy") == 1  # one table, from the main process
    history = json.loads((output / "fold1" / "log_history.json").read_text())
    assert max(entry["step"] for entry in history) == 20  # the data was split between the processes
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1  # one rank wrote the cache, no leftovers
    assert not list((tmp_path / "cache").glob("*.tmp"))


def test_offline_hub_dataset_fails_fast_with_how_to_pass_a_local_folder(tmp_path, monkeypatch, capsys):
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit) as exit_info:
        main(["--dataset", "nobody/not-a-cached-dataset", "--output-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert "nobody/not-a-cached-dataset" in message and "--dataset /path/to/ESC-50-master" in message


def test_clear_errors_for_bad_inputs(esc50_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        main(["--dataset", str(tmp_path / "empty"), "--output-dir", str(tmp_path / "out")])
    assert "ESC-50 release layout" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--dataset", str(esc50_dir), "--folds", "7", "--output-dir", str(tmp_path / "out")])
    assert "Folds [7] are not in" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path / "empty"), "--dataset", str(esc50_dir), "--output-dir", str(tmp_path / "o")])
    assert "Could not load the model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--dataset", str(esc50_dir), "--knn", "--mode", "finetune", "--output-dir", str(tmp_path / "out")])
    assert "--knn" in capsys.readouterr().err


def test_notebook_runs_headless_and_draws_its_figures(esc50_dir, dasheng_dir, cache_dir, tmp_path):
    nbclient = pytest.importorskip("nbclient")
    import nbformat

    notebook = nbformat.read(REPO / "notebooks" / "esc50_linear_probe.ipynb", as_version=4)
    env = {
        "DASHENG_NOTEBOOK_MODEL": str(dasheng_dir),
        "DASHENG_NOTEBOOK_DATASET": str(esc50_dir),
        "DASHENG_NOTEBOOK_OUTPUT": str(tmp_path / "notebook-run"),
        "DASHENG_NOTEBOOK_CACHE": str(cache_dir),
        "HF_HUB_OFFLINE": "1",
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
    }
    previous = {key: os.environ.get(key) for key in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        nbclient.NotebookClient(
            notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
        ).execute()
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]
    assert not [output for output in outputs if output.get("output_type") == "error"]
    images = [output for output in outputs if "image/png" in output.get("data", {})]
    assert len(images) >= 3  # mel spectrogram, training curve, confusion matrix
    assert read_metrics(tmp_path / "notebook-run")["accuracy_mean"] >= 0.5
