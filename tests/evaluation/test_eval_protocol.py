"""`dasheng-eval`'s multi-label stratified split and the warnings about classes a fold cannot score, against
scikit-learn's average precision."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from dasheng_hf.evaluation.embeddings import AudioClips
from dasheng_hf.evaluation.evaluate import main
from dasheng_hf.evaluation.protocol import EvalOptions, evaluation_splits
from test_evaluate import check_multi_label, fsdd_subset

sklearn_metrics = pytest.importorskip("sklearn.metrics")


def rare_tags(clips: int = 60, seed: int = 0) -> np.ndarray:
    """Four common classes (one per clip) and four rare ones of 2, 2, 3 and 5 clips."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((clips, 8), dtype=np.float32)
    labels[np.arange(clips), rng.integers(0, 4, clips)] = 1
    for column, count in zip(range(4, 8), (2, 2, 3, 5)):
        labels[rng.choice(clips, count, replace=False), column] = 1
    return labels


def test_multi_label_stratified_split_gives_every_class_positives_on_both_sides():
    labels = rare_tags()
    clips = AudioClips(None, labels, None, list("abcdefgh"), "x", "x")
    ((_, train, test),) = evaluation_splits(clips, EvalOptions(test_fraction=0.2, seed=0))
    assert not (train & test).any() and (train | test).all() and test.sum() == 12
    assert (labels[test].sum(0) >= 1).all() and (labels[train].sum(0) >= 1).all()
    common = labels[:, :4].sum(0)
    assert (np.abs(labels[test, :4].sum(0) - 0.2 * common) <= 1).all()  # each class's share, to one clip
    ((_, _, again),) = evaluation_splits(clips, EvalOptions(test_fraction=0.2, seed=0))
    ((_, _, other),) = evaluation_splits(clips, EvalOptions(test_fraction=0.2, seed=1))
    assert (again == test).all() and (other != test).any()  # deterministic by seed
    random = np.zeros(len(labels), dtype=bool)  # the split it replaces: a seeded permutation, blind to the classes
    random[np.random.default_rng(0).permutation(len(labels))[:12]] = True
    assert not (labels[random].sum(0) >= 1).all()  # which leaves a class without test positives here


def test_classes_of_one_clip_each_still_leave_clips_on_both_sides():
    """Iterative stratification alone puts every clip of single-clip classes where training lacks them most."""
    clips = AudioClips(None, np.eye(5, dtype=np.float32), None, list("abcde"), "x", "x")
    for seed in range(4):
        ((_, train, test),) = evaluation_splits(clips, EvalOptions(test_fraction=0.2, seed=seed))
        assert test.sum() >= 1 and train.sum() >= 1 and not (train & test).any() and (train | test).all()


def write_tags(path, files, rare: set, split=None) -> None:
    """A CSV of FSDD clips tagged with their digit, odd/even, and `rare` on the clips in `rare`."""
    rows = []
    for file in files:
        tags = [file.stem[0], "odd" if int(file.stem[0]) % 2 else "even"] + (["rare"] if file in rare else [])
        rows.append(f"{file},{';'.join(tags)}" + ("" if split is None else f",{split(file)}"))
    path.write_text("filename,tags" + ("" if split is None else ",split") + "\n" + "\n".join(rows) + "\n")


def test_stratified_multi_label_run_scores_every_class(tiny_dir, tmp_path):
    files = fsdd_subset(takes=range(5), speakers=("george",))
    random = np.random.default_rng(0).permutation(len(files))[:10]  # the test clips of a seeded random split
    rare = [file for index, file in enumerate(files) if index not in random][:2]  # which it would leave out
    table = tmp_path / "tags.csv"
    write_tags(table, files, rare=set(rare))
    output = tmp_path / "out"
    main(["--model", str(tiny_dir), "--dataset", str(table), "--label-column", "tags", "--label-separator", ";"] + [
        "--head", "linear", "--epochs", "2", "--output-dir", str(output), "--cache-dir", str(tmp_path / "cache")
    ])  # fmt: skip
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["protocol"] == "stratified" and metrics["mAP_classes"] == len(metrics["label_names"]) == 13
    check_multi_label(output, metrics)  # scikit-learn's AP over all 13 classes
    predictions = pd.read_csv(output / "predictions.csv")
    assert predictions["labels"].str.contains("rare").sum() == 1


def test_a_class_without_test_positives_is_warned_and_left_out_of_the_map(tiny_dir, tmp_path, caplog):
    files = fsdd_subset(takes=range(4), speakers=("george",))
    table = tmp_path / "tags.csv"
    train = [file for file in files if file.stem.endswith(("_0", "_1", "_2"))]
    write_tags(table, files, rare=set(train[:3]), split=lambda file: "train" if file in train else "test")
    output = tmp_path / "out"
    main(["--model", str(tiny_dir), "--dataset", str(table), "--label-column", "tags", "--label-separator", ";"] + [
        "--split-column", "split", "--head", "mlp", "--epochs", "2", "--output-dir", str(output)
    ] + ["--cache-dir", str(tmp_path / "cache")])  # fmt: skip
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["mAP_classes"] == metrics["folds"]["test"]["mAP_classes"] == 12
    check_multi_label(output, metrics)  # scikit-learn's AP over the 12 classes with test positives
    assert (
        "Fold test: 1 class(es) have no positive among its test clips (rare); their AP is undefined, so its mAP "
        "averages over the other 12." in caplog.text
    )
    assert metrics["class_ap"]["rare"] is None
