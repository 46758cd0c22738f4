"""`dasheng-eval` on FSDD in every dataset layout, single- and multi-label, against scikit-learn's metrics."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from dasheng_hf.evaluation.evaluate import main
from helpers import fsdd_files

sklearn_metrics = pytest.importorskip("sklearn.metrics")
DIGITS = "zero one two three four five six seven eight nine".split()


def fsdd_subset(takes=range(8), speakers=("george", "jackson")) -> list[Path]:
    """FSDD clips of the given takes and speakers: `{digit}_{speaker}_{take}.wav`."""
    return [
        Path(path)
        for path in fsdd_files()
        if Path(path).stem.split("_")[1] in speakers and int(Path(path).stem.split("_")[2]) in takes
    ]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def evaluate(tiny_dir, cache_dir, output: Path, *arguments: str) -> dict:
    main(["--model", str(tiny_dir), "--cache-dir", str(cache_dir), "--output-dir", str(output), *arguments])
    return json.loads((output / "metrics.json").read_text())


def check_single_label(output: Path, metrics: dict, expected_files: set[str] | None = None) -> pd.DataFrame:
    """Every fold's accuracy is scikit-learn's on the predictions written; the files are named."""
    predictions = pd.read_csv(output / "predictions.csv", dtype={"fold": str})
    assert set(metrics["folds"]) == set(predictions.fold)
    for fold, rows in predictions.groupby("fold"):
        expected = sklearn_metrics.accuracy_score(rows.label, rows.prediction)
        assert metrics["folds"][fold]["accuracy"] == pytest.approx(expected, abs=1e-12)
    assert metrics["accuracy"] == pytest.approx(np.mean([fold["accuracy"] for fold in metrics["folds"].values()]))
    assert predictions.label_name.astype(str).tolist() == [metrics["label_names"][i] for i in predictions.label]
    if expected_files is not None:
        assert {Path(name).name for name in predictions.file} == expected_files
    assert (output / "confusion_matrix.png").stat().st_size > 1000
    return predictions


def check_multi_label(output: Path, metrics: dict) -> None:
    """Every fold's mAP is scikit-learn's macro average precision on the scores written (classes with positives)."""
    predictions = pd.read_csv(output / "predictions.csv", dtype={"fold": str})
    names = metrics["label_names"]
    for fold, rows in predictions.groupby("fold"):
        targets = np.array([[name in labels.split(";") for name in names] for labels in rows["labels"]], dtype=int)
        scores = rows[[f"score:{name}" for name in names]].to_numpy()
        present = targets.sum(axis=0) > 0
        assert metrics["folds"][fold]["mAP_classes"] == present.sum()
        expected = sklearn_metrics.average_precision_score(targets[:, present], scores[:, present], average="macro")
        assert metrics["folds"][fold]["mAP"] == pytest.approx(expected, abs=1e-9)
        both = present & (targets.sum(axis=0) < len(targets))
        auc = sklearn_metrics.roc_auc_score(targets[:, both], scores[:, both], average="macro")
        assert metrics["folds"][fold]["auc"] == pytest.approx(auc, abs=1e-9)
    assert metrics["task"] == "multi-label" and np.isfinite(metrics["d_prime"])
    table = pd.read_csv(output / "per_class_ap.csv")
    assert list(table["class"]) == names


def test_folder_of_class_subfolders_knn_on_a_stratified_split(tiny_dir, cache_dir, tmp_path, capsys):
    root = tmp_path / "classes"
    files = fsdd_subset()
    for path in files:
        (root / DIGITS[int(path.stem[0])]).mkdir(parents=True, exist_ok=True)
        (root / DIGITS[int(path.stem[0])] / path.name).symlink_to(path)
    metrics = evaluate(tiny_dir, cache_dir, tmp_path / "out", "--dataset", str(root), "--head", "knn")
    assert metrics["label_names"] == sorted(DIGITS) and metrics["k"] == 10 and metrics["protocol"] == "stratified"
    predictions = check_single_label(tmp_path / "out", metrics)
    assert len(predictions) == 30  # 20 % of each class's 16 clips, rounded: 3 x 10 classes
    assert metrics["accuracy"] > 0.3  # chance is 0.1
    out = capsys.readouterr().out
    assert f"accuracy {metrics['accuracy']:.4f} on the test split" in out and "fold test:" not in out  # said once


def test_csv_with_folds_linear_head_is_quiet(tiny_dir, cache_dir, tmp_path, capfd):
    files = fsdd_subset(takes=range(5))
    table = tmp_path / "list.tsv"
    rows = [[path, DIGITS[int(path.stem[0])], int(path.stem.split("_")[2]) + 1] for path in files]
    table.write_text("path\tword\tfold\n" + "".join(f"{p}\t{w}\t{f}\n" for p, w, f in rows))
    arguments = ["--dataset", str(table), "--file-column", "path", "--label-column", "word", "--fold-column", "fold"]
    metrics = evaluate(tiny_dir, cache_dir, tmp_path / "out", *arguments, "--head", "linear", "--epochs", "20")
    assert list(metrics["folds"]) == ["1", "2", "3", "4", "5"] and metrics["protocol"] == "folds"
    check_single_label(tmp_path / "out", metrics, {path.name for path in files})
    output = capfd.readouterr()
    lines = (output.out + output.err).replace("\r", "\n").splitlines()
    assert len(lines) < 60, lines  # a 5-fold probe: the result table, not Trainer's per-step logs
    progress = [line for line in output.out.splitlines() if line.startswith("fold ")]
    assert progress == [f"fold {fold}: accuracy {result['accuracy']:.4f}" for fold, result in metrics["folds"].items()]
    assert not [line for line in output.out.splitlines() if line.strip()[:1].isdigit()]  # no table repeats them
    assert f"accuracy {metrics['accuracy']:.4f} +- {metrics['accuracy_std']:.4f} (mean of 5 folds)" in output.out
    history = json.loads((tmp_path / "out" / "fold3" / "log_history.json").read_text())
    assert len([entry for entry in history if "loss" in entry]) == 20  # the per-step logs went to a file


def test_classes_never_trained_on_and_a_k_above_the_training_set_are_warned(tiny_dir, cache_dir, tmp_path, caplog):
    """Fold 1 has only four classes (one to four), one clip each: fold 2, tested, has six classes it never trains on."""
    files = fsdd_subset(takes=range(2), speakers=("george",))
    rows = [[path, DIGITS[int(path.stem[0])], 1 + int(path.stem.split("_")[2])] for path in files]
    rows = [row for row in rows if row[1] != "nine" or row[2] == 2]  # "nine" only in fold 2
    rows = [row for row in rows if row[2] == 2 or row[1] in ("one", "two", "three", "four")]
    table = tmp_path / "list.csv"
    table.write_text("filename,word,fold\n" + "".join(f"{p},{w},{f}\n" for p, w, f in rows))
    arguments = ["--dataset", str(table), "--label-column", "word", "--fold-column", "fold", "--head", "knn"]
    metrics = evaluate(tiny_dir, cache_dir, tmp_path / "out", *arguments)
    check_single_label(tmp_path / "out", metrics)
    err = caplog.text  # on the console: one stderr line each
    assert "Fold 2: --k 10 is more than its 4 training clips; each query votes over all." in err
    unseen = (
        "Fold 2: 6 class(es) of its test clips never occur in its training clips (eight, five, nine, seven, six, ...)"
    )
    assert unseen in err
    assert "Fold 1:" not in err  # it trains on fold 2's 10 clips, every class it tests among them


def test_csv_with_given_splits_and_an_mlp(tiny_dir, cache_dir, tmp_path):
    files = fsdd_subset(takes=range(6))
    table = tmp_path / "list.csv"
    split = {0: "train", 1: "train", 2: "train", 3: "train", 4: "validation", 5: "test"}
    rows = [(path, path.stem[0], split[int(path.stem.split("_")[2])]) for path in files]
    table.write_text("filename,label,split\n" + "".join(f"{p},{label},{s}\n" for p, label, s in rows))
    metrics = evaluate(
        tiny_dir, cache_dir, tmp_path / "out", "--dataset", str(table), "--split-column", "split", "--head", "mlp"
    )
    predictions = check_single_label(tmp_path / "out", metrics)
    assert set(predictions.fold) == {"test"} and len(predictions) == 20
    assert {Path(name).stem.split("_")[2] for name in predictions.file} == {"5"}
    assert metrics["label_names"] == [str(digit) for digit in range(10)]


def test_datasets_dataset_with_class_labels_and_splits(tiny_dir, cache_dir, tmp_path):
    import datasets

    features = datasets.Features({"audio": datasets.Audio(), "digit": datasets.ClassLabel(names=DIGITS)})

    def part(takes):
        files = fsdd_subset(takes=takes)
        return datasets.Dataset.from_dict(
            {"audio": [str(path) for path in files], "digit": [int(path.stem[0]) for path in files]}, features=features
        )

    folder = tmp_path / "saved"
    datasets.DatasetDict({"train": part(range(4)), "test": part(range(4, 6))}).save_to_disk(str(folder))
    metrics = evaluate(
        tiny_dir, cache_dir, tmp_path / "out", "--dataset", str(folder), "--label-column", "digit", "--head", "knn"
    )
    assert metrics["label_names"] == DIGITS  # ClassLabel names, in their order
    predictions = check_single_label(tmp_path / "out", metrics)
    assert len(predictions) == 40 and set(predictions.fold) == {"test"}


def test_multi_label_csv_with_separator_joined_labels(tiny_dir, cache_dir, tmp_path):
    files = fsdd_subset(takes=range(6))
    table = tmp_path / "tags.csv"
    # Two labels per clip: the digit and whether it is odd; folds by take.
    parity = {path: "odd" if int(path.stem[0]) % 2 else "even" for path in files}
    rows = [(path, f"{path.stem[0]};{parity[path]}", int(path.stem[-1]) % 3) for path in files]
    table.write_text("filename,tags,fold\n" + "".join(f"{p},{t},{f}\n" for p, t, f in rows))
    arguments = ["--dataset", str(table), "--label-column", "tags", "--label-separator", ";", "--fold-column", "fold"]
    metrics = evaluate(tiny_dir, tmp_path / "cache", tmp_path / "knn", *arguments, "--head", "knn")
    (cached,) = (tmp_path / "cache").glob("*.npz")
    share, ranked = knn_by_hand(np.load(cached)["embeddings"], tmp_path / "knn", metrics)
    written = pd.read_csv(tmp_path / "knn" / "predictions.csv")
    scores = written[[f"score:{name}" for name in metrics["label_names"]]].to_numpy()
    np.testing.assert_allclose(scores, ranked[written["index"]], atol=1e-6)  # the share, ties broken by similarity
    assert (np.floor(scores * 10 + 1e-6) / 10 == share[written["index"]]).all()  # below one vote (1/k) above it
    check_multi_label(tmp_path / "knn", metrics)
    assert metrics["mAP"] > 0.3
    metrics = evaluate(tiny_dir, cache_dir, tmp_path / "linear", *arguments, "--head", "linear", "--epochs", "10")
    check_multi_label(tmp_path / "linear", metrics)


def knn_by_hand(embeddings: np.ndarray, output: Path, metrics: dict, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's cosine neighbours per fold: `(vote share, share plus summed similarity / (2k + 1) / k)`."""
    from sklearn.neighbors import NearestNeighbors

    predictions = pd.read_csv(output / "predictions.csv", dtype={"fold": str})
    names = metrics["label_names"]
    targets = np.zeros((len(embeddings), len(names)))
    for index, labels in zip(predictions["index"], predictions["labels"]):
        targets[index] = [name in labels.split(";") for name in names]
    share, ranked = np.zeros_like(targets), np.zeros_like(targets)
    for _, rows in predictions.groupby("fold"):
        test = rows["index"].to_numpy()
        train = np.setdiff1d(predictions["index"], test)
        distance, nearest = (
            NearestNeighbors(n_neighbors=k, metric="cosine").fit(embeddings[train]).kneighbors(embeddings[test])
        )
        neighbours = targets[train][nearest]  # (test, k, classes)
        share[test] = neighbours.mean(axis=1)
        summed = (neighbours * (1 - distance)[:, :, None]).sum(axis=1)
        ranked[test] = share[test] + (summed + k) / (2 * k + 1) / k
    return share, ranked


def test_multi_label_finetune_on_a_datasets_list_column(tiny_dir, tmp_path):
    import datasets

    files = fsdd_subset(takes=range(3), speakers=("george",))
    labels = [[path.stem[0], "odd" if int(path.stem[0]) % 2 else "even"] for path in files]
    folder = tmp_path / "saved"
    datasets.Dataset.from_dict({"audio": [str(path) for path in files], "tags": labels}).cast_column(
        "audio", datasets.Audio()
    ).save_to_disk(str(folder))
    output = tmp_path / "out"
    main(["--model", str(tiny_dir), "--dataset", str(folder), "--label-column", "tags", "--head", "finetune"] + [
        "--epochs", "1", "--test-fraction", "0.5", "--output-dir", str(output)
    ])  # fmt: skip
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["head"] == "finetune" and len(metrics["label_names"]) == 12
    check_multi_label(output, metrics)


def test_embeddings_from_dasheng_embed(tiny_dir, tmp_path):
    from dasheng_hf.embedding.embed import main as embed

    files = fsdd_subset(takes=range(4))
    table = tmp_path / "list.csv"
    table.write_text("filename,digit,fold\n" + "".join(f"{p},{p.stem[0]},{int(p.stem[-1]) + 1}\n" for p in files))
    embed([str(table), "--model", str(tiny_dir), "--output-dir", str(tmp_path / "embedded"), "--num-workers", "0"])
    arguments = ["--dataset", str(tmp_path / "embedded"), "--label-column", "digit", "--fold-column", "fold"]
    output = tmp_path / "out"
    main([*arguments, "--head", "knn", "--output-dir", str(output)])  # no --model: the embeddings say which
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["embedding_seconds"] < 5 and list(metrics["folds"]) == ["1", "2", "3", "4"]
    assert metrics["model"].startswith(f"{tiny_dir} (embeddings in")
    check_single_label(output, metrics, {path.name for path in files})


def test_a_label_column_with_one_class_is_one_clear_error(tiny_dir, tmp_path, capsys):
    files = fsdd_subset(takes=range(2), speakers=("george",))
    table = tmp_path / "list.csv"
    table.write_text("filename,speaker,digit\n" + "".join(f"{p},george,{p.stem[0]}\n" for p in files))
    with pytest.raises(SystemExit) as exit_info:
        main(
            ["--model", str(tiny_dir), "--dataset", str(table), "--label-column", "speaker", "--head", "knn"]
            + ["--output-dir", str(tmp_path / "o")]
        )
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "All 20 clips have the same label ('george')" in error
    assert "--label-column" in error and "Traceback" not in error and not (tmp_path / "o").exists()


def test_a_file_listed_twice_is_one_clear_error(tiny_dir, tmp_path, capsys):
    files = fsdd_subset(takes=range(2))
    table = tmp_path / "list.csv"
    table.write_text("filename,label\n" + "".join(f"{p},{p.stem[0]}\n" for p in [*files, files[3]]))
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(tiny_dir), "--dataset", str(table), "--head", "knn", "--output-dir", str(tmp_path / "o")])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in error
    assert f"row {len(files) + 2} ({files[3]}): the file is listed twice (also" in error and "row 5" in error
    assert not (tmp_path / "o").exists()


def test_offline_hub_resources_are_named_together_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit):
        main(["--dataset", "someone/sounds", "--head", "knn", "--output-dir", str(tmp_path / "o")])
    error = capsys.readouterr().err
    assert "--model 'mispeech/dasheng-base'" in error and "--dataset 'someone/sounds'" in error
    assert "dasheng-convert" in error and not (tmp_path / "o").exists()


def test_stratified_split_keeps_every_class_on_both_sides():
    from dasheng_hf.evaluation.embeddings import AudioClips
    from dasheng_hf.evaluation.protocol import EvalOptions, evaluation_splits

    labels = np.repeat(np.arange(5), 10)
    clips = AudioClips(None, labels, None, list("abcde"), "x", "x")
    ((_, train, test),) = evaluation_splits(clips, EvalOptions(test_fraction=0.2, seed=3))
    assert np.bincount(labels[test]).tolist() == [2] * 5 and not (train & test).any() and (train | test).all()
    ((_, _, again),) = evaluation_splits(clips, EvalOptions(test_fraction=0.2, seed=3))
    assert (again == test).all()


def test_readme_csv_example_columns(tmp_path):
    """The CSV reader takes a BOM, quotes and a label with commas in one column."""
    from dasheng_hf.evaluation.labelled import DatasetColumns, load_labelled_clips

    files = fsdd_subset(takes=range(1))
    table = tmp_path / "list.csv"
    with table.open("w", newline="", encoding="utf-8-sig") as handle:
        writer = csv.writer(handle)
        writer.writerow(["filename", "label"])
        writer.writerows([[path, f"{path.stem[0]},{'odd' if int(path.stem[0]) % 2 else 'even'}"] for path in files])
    clips = load_labelled_clips(str(table), DatasetColumns(label_separator=","))
    assert clips.multi_label and clips.labels.shape == (len(files), 12) and (clips.labels.sum(axis=1) == 2).all()


@pytest.mark.parametrize(
    "module", ["dasheng_hf.evaluation.evaluate", "dasheng_hf.evaluation.linear_probe", "dasheng_hf.embedding.embed"]
)
def test_help_is_parsed_before_torch_or_transformers_are_imported(module):
    """The commands' own modules import torch and transformers only after parsing (the package's light
    `__init__` is stubbed here, so that only the command's module is measured)."""
    import subprocess
    import sys

    import dasheng_hf

    code = (
        "import importlib, sys, types\n"
        f"package = types.ModuleType('dasheng_hf'); package.__path__ = [{str(Path(dasheng_hf.__file__).parent)!r}]\n"
        "sys.modules['dasheng_hf'] = package\n"
        f"module = importlib.import_module({module!r})\n"
        "try:\n    module.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(name for name in ('torch', 'transformers', 'numpy') if name in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--output-dir" in result.stdout and result.stdout.strip().splitlines()[-1] == "[]"


def test_a_fresh_process_prints_the_result_and_no_warnings_about_unused_kernels(tiny_dir, tmp_path):
    """Trainer's import, with bitsandbytes installed (the train extra), must not print its kernel-lookup warnings."""
    import subprocess
    import sys

    root = tmp_path / "classes"
    for path in fsdd_subset(takes=range(3), speakers=("george",)):
        (root / path.stem[0]).mkdir(parents=True, exist_ok=True)
        (root / path.stem[0] / path.name).symlink_to(path)
    command = [sys.executable, "-m", "dasheng_hf.evaluation.evaluate", "--model", str(tiny_dir), "--dataset"]
    command += [str(root), "--head", "linear", "--epochs", "2", "--output-dir", str(tmp_path / "out")]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "kernels-community" not in result.stderr and "publisher trust" not in result.stderr, result.stderr
    assert "accuracy" in result.stdout
