"""dasheng-export: ONNX Runtime against PyTorch and the original, the front end, the .pt2 program, int8, the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from dasheng_hf import DashengForAudioClassification, DashengModel
from helpers import (
    concatenated_fsdd,
    fsdd_clip,
    fsdd_files,
    hf_state_dict,
    make_reference_encoder,
    max_abs_diff,
    tiny_config,
)

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from dasheng_hf.deployment import exporters  # noqa: E402
from dasheng_hf.deployment.export import export_folder, main  # noqa: E402
from dasheng_hf.deployment.runtime import DashengNumpyFrontEnd, DashengOnnxEncoder  # noqa: E402

TOLERANCE = 1e-4
LABELS = {0: "zero", 1: "one", 2: "two"}


def _clips() -> list[torch.Tensor]:
    """Real speech from 30 ms (the shortest input) to 63 s: 2 to 6 chunks plus partial ones."""
    return [
        fsdd_clip(4)[:480],
        fsdd_clip(5),
        concatenated_fsdd(10 * 16000, start=20),
        concatenated_fsdd(25 * 16000 + 321, start=60),
        concatenated_fsdd(63 * 16000, start=100),
    ]


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory, reference_tiny):
    """A tiny classifier with the original's (perturbed) encoder weights, exported by the command line."""
    model = DashengForAudioClassification(tiny_config(num_labels=3, id2label=LABELS)).eval()
    model.load_state_dict(hf_state_dict(reference_tiny), strict=False)
    saved = tmp_path_factory.mktemp("saved")
    model.save_pretrained(saved)
    folder = tmp_path_factory.mktemp("export") / "out"
    assert main([str(saved), "--output-dir", str(folder), "--quantize", "int8"]) == 0
    return model, folder


def test_folder_holds_the_graphs_the_front_end_and_metadata(tiny_export):
    _, folder = tiny_export
    names = {path.name for path in folder.iterdir()}
    assert {"model.onnx", "model_quantized.onnx", "model.pt2", "front_end.npz", "front_end.json"} <= names
    assert {"dasheng_onnx.py", "dasheng_export.json", "config.json", "preprocessor_config.json"} <= names
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    metadata = {prop.key: prop.value for prop in graph.metadata_props}
    assert json.loads(metadata["sampling_rate"]) == 16000 and json.loads(metadata["hop_size"]) == 160
    assert json.loads(metadata["id2label"]) == {"0": "zero", "1": "one", "2": "two"}
    assert metadata["model_id"].endswith("saved0")
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    inputs = {item.name: item.shape for item in session.get_inputs()}
    assert inputs == {"input_values": ["batch", 64, "frames"], "attention_mask": ["batch", "frames"]}
    assert [item.name for item in session.get_outputs()] == ["last_hidden_state", "pooler_output", "logits"]
    assert DashengOnnxEncoder(folder).id2label == LABELS


def test_onnx_runtime_matches_pytorch_and_the_original_on_real_speech(tiny_export, reference_tiny, feature_extractor):
    model, folder = tiny_export
    encoder = DashengOnnxEncoder(folder, num_threads=2)
    clips = _clips()
    inputs = feature_extractor(clips, sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        expected = model.encoder(inputs.input_values, inputs.attention_mask)
        logits = model(**inputs).logits
    batched = encoder(inputs.input_values.numpy(), inputs.attention_mask.numpy())  # a mixed batch with a mask
    assert max_abs_diff(torch.from_numpy(batched.last_hidden_state), expected.last_hidden_state) <= TOLERANCE
    assert max_abs_diff(torch.from_numpy(batched.pooler_output), expected.pooler_output) <= TOLERANCE
    assert max_abs_diff(torch.from_numpy(batched.logits), logits) <= TOLERANCE
    valid = model.num_valid_tokens(inputs.attention_mask).tolist()
    for index, clip in enumerate(clips):
        with torch.no_grad():
            original = reference_tiny(clip[None])[0]
        alone = encoder(feature_extractor(clip, sampling_rate=16000, return_tensors="np")["input_values"])
        assert alone.last_hidden_state.shape[1] == original.shape[0] == valid[index]
        assert max_abs_diff(torch.from_numpy(alone.last_hidden_state[0]), original) <= TOLERANCE
        assert max_abs_diff(torch.from_numpy(batched.last_hidden_state[index, : valid[index]]), original) <= TOLERANCE
        assert max_abs_diff(torch.from_numpy(batched.pooler_output[index]), original.mean(0)) <= TOLERANCE
        assert not batched.last_hidden_state[index, valid[index] :].any()


def test_exported_program_equals_eager(tiny_export, feature_extractor):
    model, folder = tiny_export
    program = torch.export.load(str(folder / "model.pt2"))
    inputs = feature_extractor(_clips()[1:3], sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        # Keyword arguments and an int64 mask, as traced.
        hidden, pooled, logits = program.module()(
            input_values=inputs.input_values, attention_mask=inputs.attention_mask.long()
        )
        expected = model.encoder(inputs.input_values, inputs.attention_mask)
        assert max_abs_diff(logits, model(**inputs).logits) <= 1e-5
    assert max_abs_diff(hidden, expected.last_hidden_state) <= 1e-5
    assert max_abs_diff(pooled, expected.pooler_output) <= 1e-5


def test_numpy_front_end_reproduces_the_feature_extractor(tiny_export, feature_extractor):
    """
    The recipe equals the extractor's float64 computation within 1e-3 dB; the default float32 extractor differs
    from both by its FFT rounding, visible only in bins far below the clip's peak.
    """
    _, folder = tiny_export
    front_end = DashengNumpyFrontEnd.from_folder(folder)
    clips = [*_clips()[:4], 0.3 * torch.randn(16000, generator=torch.Generator().manual_seed(0))]
    for clip in clips:
        ours = front_end.log_mel(clip.numpy())
        exact = feature_extractor._log_mel([clip], torch.device("cpu"), torch.float64)[0].numpy()
        exact = np.maximum(exact, exact.max() - feature_extractor.top_db)
        assert np.abs(ours - exact).max() <= 1e-3
        default = feature_extractor(clip, sampling_rate=16000, return_tensors="np")["input_values"][0]
        loud = default > default.max() - 60
        assert np.abs(ours - default)[loud].max() <= 1e-3
        assert np.abs(ours - default).max() <= 0.1
    batch = front_end([clip.numpy() for clip in clips[:4]])
    expected = feature_extractor(clips[:4], sampling_rate=16000, return_tensors="np")
    assert np.array_equal(batch["attention_mask"], expected["attention_mask"])
    padding = expected["attention_mask"] == 0  # silence level after each clip
    assert np.abs(batch["input_values"] - expected["input_values"]).transpose(0, 2, 1)[padding].max() <= 1e-3


def test_runtime_runs_without_torch(tiny_export, feature_extractor):
    """`dasheng_onnx.py` of the folder, with torch made unimportable, gives the PyTorch model's embedding."""
    model, folder = tiny_export
    clip = fsdd_clip(7)
    with torch.no_grad():
        expected = model.encoder(**feature_extractor(clip, sampling_rate=16000, return_tensors="pt")).pooler_output
    np.save(folder.parent / "clip.npy", clip.numpy())
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # any import of torch now fails
        sys.path.insert(0, {str(folder)!r})
        import numpy as np
        from dasheng_onnx import DashengOnnxEncoder
        output = DashengOnnxEncoder({str(folder)!r}).encode_audio(np.load({str(folder.parent / "clip.npy")!r}))
        np.save({str(folder.parent / "pooled.npy")!r}, output.pooler_output)
    """)
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", script], check=True, env=environment, cwd=folder.parent)
    pooled = np.load(folder.parent / "pooled.npy")
    assert max_abs_diff(torch.from_numpy(pooled), expected) <= TOLERANCE


def test_large_models_keep_their_weights_in_external_data(tmp_path, monkeypatch):
    monkeypatch.setattr(exporters, "_EXTERNAL_DATA_BYTES", 0)
    model = DashengModel(tiny_config()).eval()
    exporters.export_onnx(model, tmp_path / "model.onnx")
    assert (tmp_path / "model.onnx.data").stat().st_size > (tmp_path / "model.onnx").stat().st_size
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    features = torch.randn(1, 64, 300) * 10 - 40
    output = session.run(None, {"input_values": features.numpy(), "attention_mask": np.ones((1, 300), np.int64)})
    with torch.no_grad():
        assert max_abs_diff(torch.from_numpy(output[1]), model(features).pooler_output) <= TOLERANCE


def _fsdd_subset(per_digit: int) -> tuple[list[torch.Tensor], np.ndarray]:
    files = fsdd_files()
    chosen = [
        index
        for digit in range(10)
        for index in [i for i, f in enumerate(files) if os.path.basename(f)[0] == str(digit)][:per_digit]
    ]
    return [fsdd_clip(index) for index in chosen], np.array([int(os.path.basename(files[i])[0]) for i in chosen])


def _nearest_neighbour_accuracy(embeddings: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Leave-one-out 1-NN by cosine similarity: accuracy and the predicted labels."""
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    predicted = labels[similarity.argmax(axis=1)]
    return float((predicted == labels).mean()), predicted


def test_base_width_parity_and_int8_accuracy(tmp_path, feature_extractor):
    """
    Base width (768, 12 heads; 2 layers to keep CI fast). ONNX fp32 equals PyTorch on a padded batch of real speech;
    int8 keeps each clip's embedding (cosine >= 0.99) and a 1-NN digit probe on 200 FSDD clips within 1 point of
    fp32. Random weights carry no trained meaning, so the probe compares the two graphs of the same model: fp32's
    accuracy is checked to be well above chance (10 %), and int8 must keep that accuracy and nearly every prediction.
    """
    reference = make_reference_encoder(embed_dim=768, depth=2, num_heads=12, seed=5)
    model = DashengModel(tiny_config(hidden_size=768, num_hidden_layers=2, num_attention_heads=12)).eval()
    model.load_state_dict(hf_state_dict(reference), strict=True)
    export_folder(model, tmp_path, "base-width-test", quantize="int8", pt2=False)
    fp32, int8 = (
        DashengOnnxEncoder(tmp_path, num_threads=2),
        DashengOnnxEncoder(tmp_path, quantized=True, num_threads=2),
    )

    mixed = feature_extractor(
        [fsdd_clip(1), concatenated_fsdd(12 * 16000, start=30)], sampling_rate=16000, return_tensors="pt"
    )
    with torch.no_grad():
        expected = model(**mixed)
    output = fp32(mixed.input_values.numpy(), mixed.attention_mask.numpy())
    assert max_abs_diff(torch.from_numpy(output.last_hidden_state), expected.last_hidden_state) <= TOLERANCE
    assert max_abs_diff(torch.from_numpy(output.pooler_output), expected.pooler_output) <= TOLERANCE

    clips, labels = _fsdd_subset(per_digit=20)
    embeddings = {"fp32": [], "int8": []}
    for start in range(0, len(clips), 50):
        features = feature_extractor(clips[start : start + 50], sampling_rate=16000, return_tensors="np")
        embeddings["fp32"].append(fp32(**features).pooler_output)
        embeddings["int8"].append(int8(**features).pooler_output)
    full, quantized = np.concatenate(embeddings["fp32"]), np.concatenate(embeddings["int8"])
    cosine = (full * quantized).sum(1) / np.linalg.norm(full, axis=1) / np.linalg.norm(quantized, axis=1)
    assert cosine.min() >= 0.99
    accuracy_fp32, predicted_fp32 = _nearest_neighbour_accuracy(full, labels)
    accuracy_int8, predicted_int8 = _nearest_neighbour_accuracy(quantized, labels)
    assert accuracy_fp32 >= 0.3, f"the probe is not informative: 1-NN accuracy {accuracy_fp32:.2f}"
    assert abs(accuracy_int8 - accuracy_fp32) <= 0.01
    assert (predicted_fp32 == predicted_int8).mean() >= 0.95
    assert (tmp_path / "model_quantized.onnx").stat().st_size < 0.4 * (tmp_path / "model.onnx").stat().st_size


def test_command_line_errors_are_one_line_and_leave_no_folder(tmp_path, capsys):
    output = tmp_path / "out"
    assert main([str(tmp_path / "missing"), "--output-dir", str(output)]) == 1
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "does not exist" in error and "missing" in error
    assert not output.exists() and list(tmp_path.iterdir()) == []
    (tmp_path / "saved").mkdir()
    assert main([str(tmp_path / "saved"), "--output-dir", str(output)]) == 1
    assert "no config.json" in capsys.readouterr().err
    assert main(["some-owner/not-cached", "--output-dir", str(output)]) == 1  # offline: HF_HUB_OFFLINE=1
    assert "not in the local Hugging Face cache" in capsys.readouterr().err and not output.exists()
    output.mkdir()
    (output / "keep.txt").write_text("x")
    assert main([str(tmp_path / "saved"), "--output-dir", str(output)]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert (output / "keep.txt").read_text() == "x"
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "saved"), "--output-dir", str(output), "--quantize", "int4"])
    assert exit_info.value.code == 2


def test_console_script():
    """`dasheng-export` is declared in pyproject; where it is not installed (an editable install from elsewhere), the
    module path it points to must work."""
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert '\ndasheng-export = "dasheng_hf.deployment.export:main"\n' in pyproject
    command = [sys.executable, "-m", "dasheng_hf.deployment.export", "--help"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--output-dir" in result.stdout and "--quantize" in result.stdout
    if shutil.which("dasheng-export") is None:
        pytest.skip("dasheng-export is not on PATH here (the package is installed from another checkout)")
    result = subprocess.run(["dasheng-export", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--output-dir" in result.stdout


def test_overwrite_replaces_the_folder_whole(tmp_path):
    DashengModel(tiny_config()).save_pretrained(tmp_path / "saved")
    output = tmp_path / "out"
    output.mkdir()
    (output / "old.txt").write_text("x")
    assert main([str(tmp_path / "saved"), "--output-dir", str(output), "--overwrite", "--no-pt2"]) == 0
    assert (output / "model.onnx").is_file() and not (output / "model.pt2").exists()
    assert not (output / "old.txt").exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out", "saved"]  # no staging or backup folder left
