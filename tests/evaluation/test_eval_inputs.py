"""`dasheng-eval`'s inputs: `--layer` on audio (equal to the layer mean by hand and to `dasheng-embed --layers`),
unfinished or missing datasets, a `--model` that embeddings ignore, and a fine-tuned head loaded quietly."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from dasheng_hf import DashengFeatureExtractor, DashengModel
from dasheng_hf.evaluation.evaluate import main
from dasheng_hf.evaluation.labelled import DatasetColumns, load_labelled_clips
from test_evaluate import fsdd_subset

SAMPLING_RATE = 16000


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """20 FSDD clips of different lengths with their digit and a fold."""
    path = tmp_path_factory.mktemp("list") / "list.csv"
    files = fsdd_subset(takes=range(2))
    path.write_text("filename,digit,fold\n" + "".join(f"{p},{p.stem[0]},{int(p.stem[-1]) + 1}\n" for p in files))
    return path


@pytest.fixture(scope="module")
def embedded(tiny_dir, table, tmp_path_factory):
    from dasheng_hf.embedding.embed import main as embed

    folder = tmp_path_factory.mktemp("embedded") / "out"
    embed([str(table), "--model", str(tiny_dir), "--output-dir", str(folder), "--num-workers", "0", "--layers", "1"])
    return folder


def run(capsys, *arguments: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(arguments))
    return exit_info.value.code, capsys.readouterr().err


def test_layer_on_audio_is_the_mean_of_its_hidden_states_cached_apart(tiny_dir, table, embedded, tmp_path):
    cache = tmp_path / "cache"
    common = ["--model", str(tiny_dir), "--dataset", str(table), "--label-column", "digit", "--head", "knn"]
    main([*common, "--layer", "1", "--cache-dir", str(cache), "--output-dir", str(tmp_path / "layer")])
    (layer_file,) = cache.glob("*.npz")
    main([*common, "--cache-dir", str(cache), "--output-dir", str(tmp_path / "last")])
    (last_file,) = set(cache.glob("*.npz")) - {layer_file}  # a cache entry of its own
    assert json.loads((tmp_path / "layer" / "metrics.json").read_text())["layer"] == 1

    clips = load_labelled_clips(str(table), DatasetColumns(label="digit"))
    model, extractor = DashengModel.from_pretrained(tiny_dir).eval(), DashengFeatureExtractor()
    layer, last = [], []
    with torch.no_grad():
        for index in range(len(clips)):
            inputs = extractor(clips.waveform(index), sampling_rate=SAMPLING_RATE, return_tensors="pt")
            outputs = model(**inputs, output_hidden_states=True)
            count = int(model.num_valid_tokens(inputs["attention_mask"])[0])
            layer.append(outputs.hidden_states[1][0, :count].mean(0))
            last.append(outputs.pooler_output[0])
    np.testing.assert_allclose(np.load(layer_file)["embeddings"], torch.stack(layer).numpy(), atol=2e-5)
    np.testing.assert_allclose(np.load(last_file)["embeddings"], torch.stack(last).numpy(), atol=2e-5)
    written = pd.read_parquet(embedded / "clips").set_index("file")  # dasheng-embed's layer_1: the same
    expected = np.stack(written.loc[[clips.file(i) for i in range(len(clips))], "layer_1"].to_numpy())
    np.testing.assert_allclose(np.load(layer_file)["embeddings"], expected, atol=2e-5)


def test_a_layer_counted_from_the_end_is_the_same_layer_everywhere(tiny_dir, table, tmp_path):
    """`--layer -1` is block 2 of this 2-block model: one cache entry, one name in metrics.json, and on
    `dasheng-embed --layers -1` output (written as layer_2) the same column."""
    from dasheng_hf.embedding.embed import main as embed

    cache = tmp_path / "cache"
    common = ["--dataset", str(table), "--label-column", "digit", "--head", "knn", "--cache-dir", str(cache)]
    main(["--model", str(tiny_dir), *common, "--layer", "-1", "--output-dir", str(tmp_path / "minus")])
    main(["--model", str(tiny_dir), *common, "--layer", "2", "--output-dir", str(tmp_path / "two")])
    assert len(list(cache.glob("*.npz"))) == 1
    minus, two = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("minus", "two"))
    assert minus["layer"] == two["layer"] == 2 and minus["accuracy"] == two["accuracy"]
    folder = tmp_path / "embedded"
    embed([str(table), "--model", str(tiny_dir), "--output-dir", str(folder), "--num-workers", "0", "--layers", "-1"])
    common = ["--dataset", str(folder), "--label-column", "digit", "--head", "knn"]
    main([*common, "--layer", "-1", "--output-dir", str(tmp_path / "embedded-minus")])
    predictions = [pd.read_csv(tmp_path / name / "predictions.csv") for name in ("embedded-minus", "two")]
    assert list(predictions[0].file) == list(predictions[1].file)
    assert list(predictions[0].prediction) == list(predictions[1].prediction)  # layer_2's embeddings, as on audio


def test_a_layer_out_of_range_or_with_finetune_is_one_line(tiny_dir, table, tmp_path, capsys):
    common = ["--model", str(tiny_dir), "--dataset", str(table), "--label-column", "digit"]
    code, error = run(capsys, *common, "--head", "knn", "--layer", "3", "--output-dir", str(tmp_path / "a"))
    assert code == 2 and error == (
        f"dasheng-eval: error: --layer 3 is out of range: {tiny_dir} has 2 blocks, so --layer takes 0 (the patch "
        f"embeddings) to 2 (the last block's output), or -1 for the last.\n"
    )
    code, error = run(capsys, *common, "--head", "finetune", "--layer", "1", "--output-dir", str(tmp_path / "b"))
    assert code == 2 and error == (
        "dasheng-eval: error: --layer picks frozen embeddings, but --head finetune trains the whole model: drop one.\n"
    )


def test_an_unfinished_embed_output_is_named_before_the_hub_is_asked(embedded, tmp_path, capsys):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(embedded, unfinished)
    (unfinished / "info.json").unlink()  # as a run stopped before its last part
    code, error = run(capsys, "--dataset", str(unfinished), "--head", "knn", "--output-dir", str(tmp_path / "o"))
    assert code == 2 and error == (
        f"dasheng-eval: error: {unfinished} is an unfinished dasheng-embed output (no info.json); rerun the same "
        f"dasheng-embed command to finish it.\n"
    )
    assert not (tmp_path / "o").exists()


def test_a_model_that_embeddings_ignore_is_warned(tiny_dir, embedded, tmp_path, caplog):
    common = ["--dataset", str(embedded), "--label-column", "digit", "--fold-column", "fold", "--head", "knn"]
    main([*common, "--model", str(tiny_dir) + "/", "--output-dir", str(tmp_path / "same")])
    main([*common, "--output-dir", str(tmp_path / "none")])
    assert "is not used" not in caplog.text  # the same model (spelt otherwise), or none given
    main([*common, "--model", "mispeech/dasheng-base", "--output-dir", str(tmp_path / "other")])
    assert (
        f"--model mispeech/dasheng-base is not used: {embedded} holds embeddings of {tiny_dir}, and no model runs "
        f"on them; drop --model, or pass the audio source as --dataset to embed it with mispeech/dasheng-base."
    ) in caplog.text


@pytest.mark.parametrize("dataset", ["data/nope.csv", "nope.tsv", "./data/nope"])
def test_a_missing_relative_path_does_not_exist(dataset, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    code, error = run(capsys, "--dataset", dataset, "--head", "knn", "--output-dir", str(tmp_path / "o"))
    assert (
        code == 2 and error == f"dasheng-eval: error: --dataset {dataset!r} does not exist (no such file or folder).\n"
    )


def test_a_hub_id_beside_a_local_folder_of_its_owner_name_is_still_a_hub_id(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mispeech").mkdir()  # e.g. other repos of the same owner, cloned
    code, error = run(capsys, "--dataset", "mispeech/esc50", "--head", "knn", "--output-dir", str(tmp_path / "o"))
    assert code == 2 and "mispeech/esc50" in error and "is not in the local Hugging Face cache" in error


def test_finetune_loads_a_fresh_head_without_the_load_report(tiny_dir, tmp_path):
    import logging

    from dasheng_hf.evaluation.embeddings import load_encoder
    from safetensors.torch import load_file, save_file

    records, handler = [], logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    loggers = [logging.getLogger(name) for name in ("transformers.modeling_utils", "dasheng_hf.modeling_dasheng")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        load_encoder(str(tiny_dir), label_names=["a", "b"])
        assert records == []  # only the new head is missing: what fine-tuning asks for
        damaged = tmp_path / "damaged"  # an encoder tensor missing too: a real problem, reported
        shutil.copytree(tiny_dir, damaged)
        weights = load_file(damaged / "model.safetensors")
        save_file({k: v for k, v in weights.items() if k != "encoder.norm.weight"}, damaged / "model.safetensors")
        load_encoder(str(damaged), label_names=["a", "b"])
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    assert len(records) == 2 and "LOAD REPORT" in records[0] and "encoder.norm.weight" in records[0]
    assert "holds no classification head" in records[1]


def test_layer_of_another_transformers_encoder_is_the_mean_of_its_hidden_states(table, tmp_path):
    from transformers import ASTConfig, ASTFeatureExtractor, ASTModel

    torch.manual_seed(0)
    folder = tmp_path / "tiny-ast"
    config = ASTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_length=128)
    model, extractor = ASTModel(config).eval(), ASTFeatureExtractor(max_length=128)
    model.save_pretrained(folder)
    extractor.save_pretrained(folder)
    main(["--model", str(folder), "--dataset", str(table), "--label-column", "digit", "--head", "knn", "--layer", "1"]
         + ["--cache-dir", str(tmp_path / "cache"), "--output-dir", str(tmp_path / "out")])  # fmt: skip
    (cached,) = (tmp_path / "cache").glob("*.npz")
    clips = load_labelled_clips(str(table), DatasetColumns(label="digit"))
    with torch.no_grad():
        expected = [
            model(
                **extractor(clips.waveform(i), sampling_rate=SAMPLING_RATE, return_tensors="pt"),
                output_hidden_states=True,
            )
            .hidden_states[1][0]
            .mean(0)
            for i in range(len(clips))
        ]
    np.testing.assert_allclose(np.load(cached)["embeddings"], torch.stack(expected).numpy(), atol=2e-5)


def test_a_k_below_one_is_one_line(table, tmp_path, capsys):
    code, error = run(capsys, "--dataset", str(table), "--head", "knn", "--k", "0", "--output-dir", str(tmp_path / "o"))
    assert code == 2 and error == "dasheng-eval: error: --k must be at least 1.\n"
