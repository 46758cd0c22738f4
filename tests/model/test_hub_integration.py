"""Configs and folders as on the Hub: old layouts load exactly, saved folders load with every Auto class offline."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dasheng_hf import DashengConfig, DashengFeatureExtractor, DashengForAudioClassification, DashengModel
from helpers import fsdd_files, hf_state_dict, load_wav, make_reference_encoder, max_abs_diff, tiny_config
from safetensors.torch import save_file
from transformers import (
    AutoConfig,
    AutoFeatureExtractor,
    AutoModel,
    AutoModelForAudioClassification,
    pipeline,
)

CODE_FILES = {
    "configuration_dasheng.py",
    "modeling_dasheng.py",
    "modeling_dasheng_layers.py",
    "modeling_dasheng_pretraining.py",
    "feature_extraction_dasheng.py",
}
FULL_AUTO_MAP = {
    "AutoConfig",
    "AutoModel",
    "AutoModelForAudioClassification",
    "AutoModelForPreTraining",
    "AutoFeatureExtractor",
}


def hub_config(name: str, **encoder_kwargs) -> dict:
    return {
        "architectures": ["DashengModel"],
        "encoder_kwargs": {"patch_size": [64, 4], "patch_stride": [64, 4], "target_length": 1008, **encoder_kwargs},
        "loss": "BCELoss",
        "model_type": "dasheng",
        "name": name,
    }


@pytest.mark.parametrize(
    ("name", "expected"),
    [("dasheng-base", (768, 12, 12)), ("dasheng-0.6B", (1280, 32, 16)), ("dasheng-1.2B", (1536, 40, 24))],
)
def test_hub_configs_read(name, expected):
    full = DashengConfig(**hub_config(name, depth=expected[1], embed_dim=expected[0], num_heads=expected[2]))
    name_only = DashengConfig(**hub_config(name))  # `name` fills what encoder_kwargs lack
    for config in (full, name_only):
        assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == expected
        assert config.intermediate_size == 4 * expected[0] and config.chunk_num_tokens == 252
    assert DashengConfig.from_preset(name).hidden_size == expected[0]


def test_config_rejects_unsupported_settings():
    with pytest.raises(ValueError, match="init_values"):
        DashengConfig(encoder_kwargs={"init_values": 0.1})
    with pytest.raises(ValueError, match="pooling"):
        DashengConfig(encoder_kwargs={"pooling": "token"})
    with pytest.raises(ValueError, match="divisible"):
        DashengConfig(hidden_size=100, num_attention_heads=12)
    with pytest.raises(ValueError, match="Unknown Dasheng preset"):
        DashengConfig.from_preset("dasheng-7B")


@pytest.mark.parametrize(("name", "width", "heads"), [("dasheng-0.6B", 1280, 16), ("dasheng-1.2B", 1536, 24)])
def test_large_widths_load_from_hub_layout_and_match(tmp_path, feature_extractor, name, width, heads):
    """A folder as on the Hub today (old config, weights without front_end, no code) loads exactly."""
    reference = make_reference_encoder(embed_dim=width, depth=2, num_heads=heads, seed=width)
    (tmp_path / "config.json").write_text(json.dumps(hub_config(name, depth=2, embed_dim=width, num_heads=heads)))
    save_file(hf_state_dict(reference), str(tmp_path / "model.safetensors"))
    model, info = DashengModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    waveform = load_wav(fsdd_files()[10])
    with torch.no_grad():
        expected = reference(waveform[None])
        ours = model.eval()(**feature_extractor(waveform, sampling_rate=16000, return_tensors="pt"))
    assert max_abs_diff(ours.last_hidden_state, expected) <= 1e-4


# The Hub card's code, run where only transformers is imported: the folder's own code files are used.
CARD_SNIPPET = """
import sys
import torch
from transformers import AutoModel, AutoFeatureExtractor

model_name = sys.argv[1]
feature_extractor = AutoFeatureExtractor.from_pretrained(model_name, trust_remote_code=True)
model = AutoModel.from_pretrained(model_name, outputdim=None, trust_remote_code=True)
audio = torch.load(sys.argv[2])
inputs = feature_extractor(audio, sampling_rate=16000, return_tensors="pt")
assert inputs.input_values.shape == (1, 64, 101), inputs.input_values.shape
with torch.no_grad():
    outputs = model(**inputs)
assert outputs.hidden_states.shape == (1, 25, 64), outputs.hidden_states.shape
assert outputs.logits.shape == (1, 64), outputs.logits.shape
assert torch.allclose(outputs.logits, outputs.hidden_states.mean(1), atol=1e-6)
torch.save(outputs.hidden_states, sys.argv[3])

# The old card's fine-tuning flow: a new head, frozen encoder, a loss on the logits before any sigmoid.
model = AutoModel.from_pretrained(model_name, outputdim=50, ignore_mismatched_sizes=True, trust_remote_code=True)
model.freeze_encoder()
model.config.loss = "CrossEntropyLoss"
outputs = model(inputs.input_values, labels=torch.tensor([7]))
assert outputs.logits.shape == (1, 50)
assert torch.allclose(outputs.loss, torch.nn.functional.cross_entropy(outputs.logits, torch.tensor([7])))
outputs.loss.backward()
assert model.outputlayer[1].weight.grad is not None and model.encoder.norm.weight.grad is None
print(type(model).__module__)
"""


def test_card_snippet_runs_on_saved_folder(tmp_path, tiny_pair):
    reference, _ = tiny_pair
    folder = tmp_path / "dasheng-tiny"
    model = DashengModel(DashengConfig(name="dasheng-base", hidden_size=64, num_hidden_layers=2, num_attention_heads=4))
    model.load_state_dict(hf_state_dict(reference))
    model.save_pretrained(folder)
    assert CODE_FILES <= {p.name for p in folder.iterdir()}
    assert set(json.loads((folder / "config.json").read_text())["auto_map"]) == FULL_AUTO_MAP
    assert "AutoFeatureExtractor" in json.loads((folder / "preprocessor_config.json").read_text())["auto_map"]

    audio = torch.randn(1, 16000)
    torch.save(audio, tmp_path / "audio.pt")
    script = tmp_path / "card.py"
    script.write_text(CARD_SNIPPET)
    result = subprocess.run(
        [sys.executable, str(script), str(folder), str(tmp_path / "audio.pt"), str(tmp_path / "out.pt")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1].startswith("transformers_modules")
    with torch.no_grad():
        assert max_abs_diff(torch.load(tmp_path / "out.pt"), reference(audio)) <= 1e-4


@pytest.mark.parametrize("saver", ["model", "classifier", "config", "feature_extractor"])
def test_save_pretrained_of_each_class_writes_a_complete_folder(tmp_path, saver):
    config = tiny_config(num_labels=3, id2label={0: "a", 1: "b", 2: "c"}, label2id={"a": 0, "b": 1, "c": 2})
    if saver == "model":
        DashengModel(config).save_pretrained(tmp_path)
    elif saver == "classifier":
        DashengForAudioClassification(config).save_pretrained(tmp_path)
    elif saver == "config":
        config.save_pretrained(tmp_path)
    else:
        DashengFeatureExtractor().save_pretrained(tmp_path)
    assert CODE_FILES <= {p.name for p in tmp_path.iterdir()}
    if saver != "feature_extractor":
        assert set(json.loads((tmp_path / "config.json").read_text())["auto_map"]) == FULL_AUTO_MAP
        assert type(AutoConfig.from_pretrained(tmp_path, trust_remote_code=True)).__name__ == "DashengConfig"
    if saver in ("model", "classifier", "feature_extractor"):
        extractor = AutoFeatureExtractor.from_pretrained(tmp_path, trust_remote_code=True)
        assert type(extractor).__name__ == "DashengFeatureExtractor"
    if saver in ("model", "classifier"):
        base = AutoModel.from_pretrained(tmp_path, trust_remote_code=True)
        head = AutoModelForAudioClassification.from_pretrained(tmp_path, trust_remote_code=True)
        assert type(base).__name__ == "DashengModel" and type(head).__name__ == "DashengForAudioClassification"
        assert head.config.id2label[2] == "c"


def test_registered_auto_classes_without_remote_code(tmp_path):
    DashengForAudioClassification(tiny_config(num_labels=2)).save_pretrained(tmp_path)
    model = AutoModelForAudioClassification.from_pretrained(tmp_path)
    assert isinstance(model, DashengForAudioClassification)
    assert isinstance(AutoModel.from_pretrained(tmp_path), DashengModel)


def test_device_map_auto(tmp_path):
    """`device_map="auto"` loads, and a split across devices keeps each transformer block whole."""
    accelerate = pytest.importorskip("accelerate")
    DashengModel(tiny_config(num_hidden_layers=6)).save_pretrained(tmp_path)
    model = DashengModel.from_pretrained(tmp_path, device_map="auto")
    reference = DashengModel.from_pretrained(tmp_path)
    features = torch.randn(1, 64, 1201) * 10
    with torch.no_grad():
        assert max_abs_diff(model(features).last_hidden_state, reference(features).last_hidden_state) == 0
    layer_bytes = sum(p.numel() * 4 for p in model.encoder.blocks[0].parameters())
    device_map = accelerate.infer_auto_device_map(
        model, max_memory={0: int(3.5 * layer_bytes), "cpu": 10**9}, no_split_module_classes=model._no_split_modules
    )
    assert set(device_map.values()) == {0, "cpu"}
    assert all(name.count(".") <= 2 for name in device_map if name.startswith("encoder.blocks"))


@pytest.fixture(scope="module")
def classifier_folder(tmp_path_factory, reference_tiny):
    folder = tmp_path_factory.mktemp("classifier")
    labels = [f"digit {i}" for i in range(10)]
    config = tiny_config(num_labels=10, id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    model = DashengForAudioClassification(config)
    model.load_state_dict(hf_state_dict(reference_tiny), strict=False)
    model.save_pretrained(folder)
    return folder


def test_pipeline_on_wav_paths(classifier_folder):
    """pipeline() reads an 8 kHz WAV path with ffmpeg, resamples, and returns the config's labels."""
    classifier = pipeline("audio-classification", model=str(classifier_folder), trust_remote_code=True)
    assert type(classifier).__name__ == "DashengAudioClassificationPipeline"
    files = fsdd_files()[:3]
    single = [classifier(path, top_k=10) for path in files]
    assert all({result["label"] for result in results} == {f"digit {i}" for i in range(10)} for results in single)
    assert all(abs(sum(r["score"] for r in results) - 1) < 1e-4 for results in single)  # softmax, single label
    # Batched clips of different lengths give the same scores as one at a time.
    batched = classifier(files, batch_size=3, top_k=10)
    for alone, together in zip(single, batched):
        assert [r["label"] for r in alone] == [r["label"] for r in together]
        assert max(abs(a["score"] - b["score"]) for a, b in zip(alone, together)) <= 1e-4


def test_package_import_registers_auto_classes():
    code = (
        "import dasheng_hf\n"
        "from transformers import AutoConfig, AutoModelForAudioClassification\n"
        "config = AutoConfig.for_model('dasheng', hidden_size=64, num_hidden_layers=1, num_attention_heads=4)\n"
        "print(type(AutoModelForAudioClassification.from_config(config)).__name__)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "DashengForAudioClassification"


def test_pipeline_multi_label_gives_sigmoid_scores(tmp_path, reference_tiny):
    """Multi-label models (AudioSet) get independent sigmoid scores on every transformers version."""
    labels = ["speech", "music", "dog"]
    config = tiny_config(
        num_labels=3,
        problem_type="multi_label_classification",
        id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)},
    )
    model = DashengForAudioClassification(config)
    model.load_state_dict(hf_state_dict(reference_tiny), strict=False)
    model.save_pretrained(tmp_path)
    classifier = pipeline("audio-classification", model=str(tmp_path), trust_remote_code=True)
    path = fsdd_files()[11]
    scores = {result["label"]: result["score"] for result in classifier(path, top_k=3)}
    from transformers.pipelines.audio_utils import ffmpeg_read

    waveform = ffmpeg_read(Path(path).read_bytes(), 16000)  # the pipeline's own decoding and resampling
    features = DashengFeatureExtractor()(waveform, sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        expected = torch.sigmoid(model.eval()(**features).logits[0])
    for index, label in enumerate(labels):
        assert abs(scores[label] - float(expected[index])) <= 1e-4


def test_trainer_predictions_are_the_logits(tmp_path):
    """With the card's `outputdim` head, Trainer.predict returns logits, not the per-token tensors."""
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainingArguments

    class Clips(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, index):
            return {"input_values": torch.randn(64, 101) * 10, "labels": torch.tensor(index % 3)}

    model = DashengModel(tiny_config(outputdim=3, loss="CrossEntropyLoss"))
    arguments = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=2, report_to=[], use_cpu=True)
    prediction = Trainer(model=model, args=arguments).predict(Clips())
    assert prediction.predictions.shape == (4, 3)
    assert prediction.metrics["test_loss"] > 0


def test_loading_refuses_damaged_weights_and_foreign_front_ends(tmp_path):
    """NaN weights, negative BatchNorm variances and a preprocessor config of other features are errors at load."""
    from safetensors.torch import load_file

    folder = tmp_path / "model"
    DashengModel(tiny_config()).save_pretrained(folder)
    weights = load_file(folder / "model.safetensors")
    for name, damage, message in (
        ("encoder.blocks.1.mlp.fc2.weight", float("nan"), "encoder.blocks.1.mlp.fc2.weight holds NaN"),
        ("encoder.init_bn.1.running_var", -1.0, "encoder.init_bn.1.running_var holds negative"),
    ):
        damaged = dict(weights)
        damaged[name] = damaged[name].clone().fill_(damage)
        broken = tmp_path / name
        shutil.copytree(folder, broken)
        save_file(damaged, broken / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(ValueError, match=message):
            DashengModel.from_pretrained(broken)
        with pytest.raises(ValueError, match=message):
            AutoModel.from_pretrained(broken, trust_remote_code=True)

    preprocessor = json.loads((folder / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps({**preprocessor, "n_fft": 1024, "center": False}))
    with pytest.raises(ValueError, match=r"FFT size: the model's config has n_fft=512.*check_front_end=False"):
        AutoModel.from_pretrained(folder, trust_remote_code=True)
    assert DashengModel.from_pretrained(folder, check_front_end=False).config.n_fft == 512
