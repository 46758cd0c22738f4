"""PEFT: LoRA on the attention projections of DashengForAudioClassification, trained with Trainer, saved, reloaded."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from dasheng_hf import DashengFeatureExtractor, DashengForAudioClassification
from helpers import fsdd_files, hf_state_dict, load_wav, max_abs_diff, tiny_config
from transformers import Trainer, TrainingArguments

peft = pytest.importorskip("peft")

DIGITS = (0, 1)


class Clips(torch.utils.data.Dataset):
    def __init__(self, features, labels):
        self.features, self.labels = features, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return {
            "input_values": self.features["input_values"][index],
            "attention_mask": self.features["attention_mask"][index],
            "labels": self.labels[index],
        }


@pytest.fixture(scope="module")
def digits():
    """Spoken 0s and 1s (both speakers), padded together: features for the default collator."""
    files = [path for path in fsdd_files() if int(Path(path).name.split("_")[0]) in DIGITS]
    files = [path for path in files if int(Path(path).stem.split("_")[2]) < 12]
    clips = [load_wav(path) for path in files]
    labels = torch.tensor([DIGITS.index(int(Path(path).name.split("_")[0])) for path in files])
    features = DashengFeatureExtractor()(clips, sampling_rate=16000, return_tensors="pt", return_attention_mask=True)
    return Clips(features, labels)


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory, reference_tiny):
    folder = tmp_path_factory.mktemp("dasheng-classifier")
    config = tiny_config(num_labels=2, id2label={0: "zero", 1: "one"}, label2id={"zero": 0, "one": 1})
    model = DashengForAudioClassification(config)
    model.load_state_dict(hf_state_dict(reference_tiny), strict=False)
    model.save_pretrained(folder)
    return folder


def lora_model(folder, reentrant_checkpointing: bool = False, target_modules=("qkv", "proj")):
    model = DashengForAudioClassification.from_pretrained(folder)
    if reentrant_checkpointing:  # Transformers 5 renamed it; 4.57 only has the old name
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=target_modules, modules_to_save=["outputlayer"])
    torch.manual_seed(0)  # the same LoRA initialisation every time
    return peft.get_peft_model(model, config)


def arguments(tmp_path, **kwargs):
    return TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        learning_rate=3e-3,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=5,
        seed=0,
        **kwargs,
    )


def test_lora_trains_saves_and_reloads(tmp_path, base_folder, digits):
    model = lora_model(base_folder)
    adapted = {name for name, module in model.named_modules() if isinstance(module, peft.tuners.lora.LoraLayer)}
    # Every attention projection; `proj` also names the patch embedding's convolution.
    assert sum(bool(re.search(r"blocks\.\d+\.attn\.(qkv|proj)$", name)) for name in adapted) == 4
    assert any(name.endswith("patch_embed.proj") for name in adapted)
    trainable = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    assert trainable and all("lora_" in name or "outputlayer" in name for name in trainable)
    before = {
        name: tensor.clone() for name, tensor in model.get_base_model().state_dict().items() if "lora" not in name
    }

    trainer = Trainer(model=model, args=arguments(tmp_path, max_steps=30), train_dataset=digits, eval_dataset=digits)
    start = trainer.evaluate()["eval_loss"]
    trainer.train()
    end = trainer.evaluate()["eval_loss"]
    print(f"eval loss before {start:.3f}, after {end:.3f}")
    assert end < 0.5 * start, (start, end)
    after = model.get_base_model().state_dict()
    frozen = [name for name in before if "original_module" in name or "base_layer" in name or "blocks" in name]
    assert frozen and all(torch.equal(before[name], after[name]) for name in frozen)  # the encoder is untouched

    model.save_pretrained(tmp_path / "adapter")
    saved = {path.name for path in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= saved and "model.safetensors" not in saved
    reloaded = peft.PeftModel.from_pretrained(
        DashengForAudioClassification.from_pretrained(base_folder), tmp_path / "adapter"
    )
    batch = {key: value[:6] for key, value in digits.features.items()}
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
        assert max_abs_diff(reloaded.eval()(**batch).logits, expected) == 0
        merged = reloaded.merge_and_unload()
        assert isinstance(merged, DashengForAudioClassification)
        assert max_abs_diff(merged(**batch).logits, expected) <= 1e-5


@pytest.mark.parametrize(("target_modules", "num_adapted"), [(("qkv", "proj"), 5), (r".*\.attn\.(qkv|proj)", 4)])
def test_lora_with_gradient_checkpointing(base_folder, digits, target_modules, num_adapted):
    """
    Reentrant checkpointing needs block inputs that require grad. With the patch embedding frozen (attention-only
    LoRA), PEFT's `enable_input_require_grads` provides them through `get_input_embeddings`.
    """
    batch = {key: value[:4] for key, value in digits.features.items()} | {"labels": digits.labels[:4]}
    gradients = []
    for checkpointing in (False, True):
        model = lora_model(base_folder, checkpointing, target_modules).train()
        blocks = model.get_base_model().encoder.blocks
        assert all(block.gradient_checkpointing == checkpointing for block in blocks)
        model(**batch).loss.backward()
        gradients.append({name: p.grad for name, p in model.named_parameters() if "lora_B" in name})
    plain, checkpointed = gradients
    assert plain.keys() == checkpointed.keys() and len(plain) == num_adapted
    for name in plain:
        assert checkpointed[name] is not None, f"no gradient for {name} under checkpointing"
        assert float(plain[name].abs().max()) > 0
        assert max_abs_diff(checkpointed[name], plain[name]) <= 1e-5, name
