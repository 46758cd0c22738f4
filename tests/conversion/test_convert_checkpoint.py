"""convert_checkpoint.py: original-format checkpoints with perturbed weights, converted and compared to the original."""

from __future__ import annotations

import ctypes
import errno
import functools
import gzip
import http.server
import json
import os
import pickle
import re
import signal
import struct
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest
import torch
from dasheng_hf import convert_checkpoint
from dasheng_hf.configuration_dasheng import DashengConfig
from dasheng_hf.conversion import checkpoint_contents, output_folder
from dasheng_hf.conversion.model_card import build_model_card
from dasheng_hf.convert_checkpoint import main
from helpers import concatenated_fsdd, fsdd_files, hf_state_dict, labels_file, make_reference_encoder, max_abs_diff
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    AutoFeatureExtractor,
    AutoModel,
    AutoModelForAudioClassification,
    pipeline,
)
from transformers.pipelines.audio_utils import ffmpeg_read

REPO_ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = 1e-4


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.getbasetemp() / "torch_home"))


def save_original(path: Path, reference: torch.nn.Module, **config) -> Path:
    """An encoder checkpoint in the released format: `{"model": state dict with front end, "config": dict}`."""
    torch.save({"model": reference.state_dict(), "config": config}, path)
    return path


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    reference = make_reference_encoder(64, 2, 4, seed=3)
    path = tmp_path_factory.mktemp("tiny") / "tiny.pt"
    save_original(path, reference, embed_dim=64, depth=2, num_heads=4, lr=3e-4, time_patch_out=0.2)
    return reference, path


def encode(folder: Path, audio: torch.Tensor) -> torch.Tensor:
    """Token embeddings of `audio` from a converted folder, loaded through the Auto classes."""
    extractor = AutoFeatureExtractor.from_pretrained(folder, trust_remote_code=True)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        return model(**extractor(audio.numpy(), sampling_rate=16000, return_tensors="pt")).last_hidden_state


def reference_tokens(reference: torch.nn.Module, audio: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return reference(audio[None])


def error_line(stderr: str) -> str:
    """The one `error:` line of a failed run (progress bars aside); there must be no traceback."""
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error:") or ": error:" in line]
    assert len(lines) == 1, stderr
    return lines[0]


def assert_left_nothing(parent: Path, name: str) -> None:
    leftovers = [path.name for path in parent.iterdir() if path.name == name or path.name.startswith(f".{name}.")]
    assert leftovers == []


@pytest.mark.parametrize("width,heads", [(768, 12), (1280, 16), (1536, 24)])
def test_released_widths_convert_and_match_the_original(tmp_path: Path, width: int, heads: int) -> None:
    # The stored config lacks num_heads (the original's size helpers set it): it must come from the known sizes.
    reference = make_reference_encoder(width, 1, heads, seed=width)
    checkpoint = save_original(tmp_path / "encoder.pt", reference, embed_dim=width, depth=1, eval_avg="mean")
    assert main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "out")]) == 0

    folder = tmp_path / "out"
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (width, 1, heads)
    assert set(json.loads((folder / "config.json").read_text())["auto_map"]) >= {
        "AutoConfig",
        "AutoModel",
        "AutoModelForAudioClassification",
        "AutoFeatureExtractor",
    }
    audio = concatenated_fsdd(16000 * 12)  # two chunks of 10.08 s
    assert max_abs_diff(encode(folder, audio), reference_tokens(reference, audio)) < TOLERANCE


def test_config_keys_that_change_the_maths_are_honoured(tmp_path: Path) -> None:
    reference = make_reference_encoder(64, 1, 4, seed=5, target_length=512, top_db=80)
    checkpoint = save_original(tmp_path / "c.pt", reference, num_heads=4, target_length=512, top_db=80, pooling="mean")
    assert main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "out")]) == 0
    config = AutoConfig.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert (config.target_length, config.top_db) == (512, 80)
    assert json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())["top_db"] == 80
    audio = concatenated_fsdd(16000 * 7)  # three chunks of 5.12 s
    assert max_abs_diff(encode(tmp_path / "out", audio), reference_tokens(reference, audio)) < TOLERANCE


def test_verify_passes_for_float32_and_bfloat16(tiny, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _, checkpoint = tiny
    assert main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "f32"), "--verify"]) == 0
    differences = [float(x) for x in re.findall(r"token embeddings = (\S+)", capsys.readouterr().out)]
    assert len(differences) == 2 and max(differences) < TOLERANCE

    args = ["--checkpoint", str(checkpoint), "--output", str(tmp_path / "bf16"), "--verify", "--dtype", "bfloat16"]
    assert main(args) == 0
    cosines = [float(x) for x in re.findall(r"pooled embeddings = (\S+)", capsys.readouterr().out)]
    assert len(cosines) == 2 and min(cosines) >= 0.999
    weights = load_file(tmp_path / "bf16" / "model.safetensors")
    assert weights["encoder.blocks.0.attn.qkv.weight"].dtype == torch.bfloat16


def test_failed_verification_leaves_nothing(tiny, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(convert_checkpoint, "FLOAT32_TOLERANCE", 0.0)
    monkeypatch.setattr(checkpoint_contents, "sweep_audio", lambda seconds: torch.randn(16000 * seconds) * 1e3)
    assert main(["--checkpoint", str(tiny[1]), "--output", str(tmp_path / "new" / "out"), "--verify"]) == 1
    assert "Verification against the original implementation failed" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # neither the folder, its staging copy nor the created parent


def test_interrupt_leaves_the_previous_folder_untouched(tiny, tmp_path: Path, monkeypatch, capsys) -> None:
    output = tmp_path / "out"
    output.mkdir()
    (output / "old.txt").write_text("previous conversion")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_checkpoint, "build_model_card", interrupted)
    assert main(["--checkpoint", str(tiny[1]), "--output", str(output), "--overwrite"]) == 130
    assert error_line(capsys.readouterr().err) == "error: interrupted by SIGINT; no partial output was left."
    assert [path.name for path in tmp_path.iterdir()] == ["out"]
    assert [path.name for path in output.iterdir()] == ["old.txt"]


def test_non_empty_output_needs_overwrite(tiny, tmp_path: Path, capsys) -> None:
    output = tmp_path / "out"
    output.mkdir()
    (output / "old.txt").write_text("keep me")
    assert main(["--checkpoint", str(tiny[1]), "--output", str(output)]) == 1
    assert "not empty; pass --overwrite" in capsys.readouterr().err
    assert (output / "old.txt").exists()

    assert main(["--checkpoint", str(tiny[1]), "--output", str(output), "--overwrite"]) == 0
    assert not (output / "old.txt").exists() and (output / "model.safetensors").exists()
    assert [path.name for path in tmp_path.iterdir()] == ["out"]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, torch.nn.Sequential, Path]:
    """An AudioSet-style fine-tune: a plain state dict with the encoder under `encoder.` and the head, no config."""
    reference = make_reference_encoder(768, 1, 12, seed=11)
    generator = torch.Generator().manual_seed(12)
    head = torch.nn.Sequential(torch.nn.LayerNorm(768), torch.nn.Linear(768, 527))
    with torch.no_grad():
        for tensor in head.parameters():
            tensor.add_(0.3 * torch.randn(tensor.shape, generator=generator))
    state = {f"encoder.{key}": value for key, value in reference.state_dict().items()}
    state.update({f"outputlayer.{key}": value for key, value in head.state_dict().items()})
    path = tmp_path_factory.mktemp("classifier") / "audioset.pt"
    torch.save(state, path)
    return reference, head.eval(), path


def test_classifier_gives_the_original_logits_and_pipeline_labels(classifier, tmp_path: Path, capsys) -> None:
    reference, head, checkpoint = classifier
    folder = tmp_path / "audioset"
    assert (
        main(
            [
                "--checkpoint",
                str(checkpoint),
                "--output",
                str(folder),
                "--labels",
                str(labels_file("audioset_class_labels_indices.csv")),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "under the prefix 'encoder.'" in out and "all 23 encoder tensors matched" in out

    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    assert config.problem_type == "multi_label_classification"
    assert (config.id2label[0], config.label2id["Speech"], config.num_labels) == ("Speech", 0, 527)
    extractor = AutoFeatureExtractor.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForAudioClassification.from_pretrained(folder, trust_remote_code=True).eval()
    audio = concatenated_fsdd(16000 * 3)
    with torch.no_grad():
        logits = model(**extractor(audio.numpy(), sampling_rate=16000, return_tensors="pt")).logits
        expected = head(reference(audio[None]).mean(dim=1))
    assert max_abs_diff(logits, expected) < TOLERANCE

    wav = fsdd_files()[0]  # 8 kHz: the pipeline reads and resamples it with ffmpeg
    predictions = pipeline("audio-classification", model=str(folder), trust_remote_code=True)(wav, top_k=3)
    decoded = torch.from_numpy(ffmpeg_read(Path(wav).read_bytes(), 16000).copy())
    with torch.no_grad():
        scores = head(reference(decoded[None]).mean(dim=1))[0].sigmoid()
    top = scores.topk(3)
    assert [p["label"] for p in predictions] == [config.id2label[int(i)] for i in top.indices]
    assert max(abs(p["score"] - float(s)) for p, s in zip(predictions, top.values)) < TOLERANCE


def test_classifier_with_a_missing_encoder_tensor_is_refused(classifier, tmp_path: Path, capsys) -> None:
    state = torch.load(classifier[2], weights_only=True)
    del state["encoder.blocks.0.attn.proj.bias"]
    torch.save(state, tmp_path / "broken.pt")
    assert main(["--checkpoint", str(tmp_path / "broken.pt"), "--output", str(tmp_path / "out")]) == 1
    assert "missing encoder.blocks.0.attn.proj.bias (expected (768,))" in capsys.readouterr().err
    assert_left_nothing(tmp_path, "out")


def test_labels_must_cover_every_output(classifier, tmp_path: Path, capsys) -> None:
    csv = tmp_path / "labels.csv"
    csv.write_text("index,mid,display_name\n0,/m/a,Speech\n1,/m/b,Music\n")
    args = ["--checkpoint", str(classifier[2]), "--output", str(tmp_path / "out"), "--labels", str(csv)]
    assert main(args) == 1
    assert "the classifier has 527 outputs" in capsys.readouterr().err
    assert_left_nothing(tmp_path, "out")


def test_labels_on_an_encoder_are_refused(tiny, tmp_path: Path, capsys) -> None:
    args = [
        "--checkpoint",
        str(tiny[1]),
        "--output",
        str(tmp_path / "out"),
        "--labels",
        str(labels_file("audioset_class_labels_indices.csv")),
    ]
    assert main(args) == 1
    assert "--labels only applies to classifiers" in capsys.readouterr().err


def test_wrong_tensors_are_listed_with_their_shapes(tiny, tmp_path: Path, capsys) -> None:
    reference, _ = tiny
    state = dict(reference.state_dict())
    del state["blocks.1.norm2.bias"]
    state["blocks.0.ls1.gamma"] = torch.ones(64)
    state["blocks.0.mlp.fc2.weight"] = torch.zeros(64, 128)
    torch.save({"model": state, "config": {"num_heads": 4}}, tmp_path / "bad.pt")
    assert main(["--checkpoint", str(tmp_path / "bad.pt"), "--output", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "missing encoder.blocks.1.norm2.bias (expected (64,))" in err
    assert "unexpected encoder.blocks.0.ls1.gamma (64,)" in err
    assert "misshapen encoder.blocks.0.mlp.fc2.weight: found (64, 128), expected (64, 256)" in err
    assert_left_nothing(tmp_path, "out")


@pytest.mark.parametrize(
    "config,message",
    [
        (
            {"init_values": 1e-5, "pooling": "token"},
            "pooling='token' (only 'mean' pooling is supported); init_values=1e-05 (LayerScale is not supported)",
        ),
        ({"attention_type": "FlashAttention"}, "attention_type='FlashAttention'"),
        ({"f_max": 7000}, "front_end.0.mel_scale.fb differs"),
        ({"win_size": 400}, "front_end.0.spectrogram.window has shape (512,), expected (400,)"),
        ({"target_length": 512}, "time_pos_embed has 252 positions but target_length=512 needs 128"),
    ],
)
def test_unsupported_or_inconsistent_configs_are_refused(tiny, tmp_path: Path, capsys, config, message) -> None:
    save_original(tmp_path / "c.pt", tiny[0], num_heads=4, **config)
    assert main(["--checkpoint", str(tmp_path / "c.pt"), "--output", str(tmp_path / "out")]) == 1
    assert message in capsys.readouterr().err
    assert_left_nothing(tmp_path, "out")


class _RunsCode:
    """Pickles as a call to `exec`: loading it without weights_only would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_a_pickle_carrying_code_is_refused_without_running_it(tiny, tmp_path: Path, capsys, zip_format) -> None:
    marker = tmp_path / "code-ran"
    checkpoint = tmp_path / "evil.pt"
    evil = {"model": tiny[0].state_dict(), "config": {"num_heads": 4, "norm_layer": _RunsCode(marker)}}
    torch.save(evil, checkpoint, _use_new_zipfile_serialization=zip_format)
    assert main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "out")]) == 1
    line = error_line(capsys.readouterr().err)
    assert "`builtins.exec` at ['config']['norm_layer']" in line and "could run arbitrary code" in line
    assert not marker.exists()
    assert_left_nothing(tmp_path, "out")


def test_a_partial_in_the_config_is_named(tiny, tmp_path: Path, capsys) -> None:
    layer_norm = functools.partial(torch.nn.LayerNorm, eps=1e-6)
    torch.save({"model": tiny[0].state_dict(), "config": {"norm_layer": layer_norm}}, tmp_path / "p.pt")
    assert main(["--checkpoint", str(tmp_path / "p.pt"), "--output", str(tmp_path / "out")]) == 1
    assert "`functools.partial` at ['config']['norm_layer']" in capsys.readouterr().err


def test_hub_layout_folder_is_rewritten(tiny, tmp_path: Path) -> None:
    reference, _ = tiny
    old = tmp_path / "old"
    old.mkdir()
    old_config = {
        "architectures": ["DashengModel"],
        "auto_map": {"AutoModel": "modeling_dasheng.DashengModel"},
        "model_type": "dasheng",
        "name": "dasheng-base",
        "encoder_kwargs": {"embed_dim": 64, "depth": 2, "num_heads": 4},
    }
    (old / "config.json").write_text(json.dumps(old_config))
    save_file(hf_state_dict(reference), old / "model.safetensors")
    assert main(["--checkpoint", str(old), "--output", str(tmp_path / "new")]) == 0

    new = tmp_path / "new"
    written = json.loads((new / "config.json").read_text())
    assert written["auto_map"]["AutoFeatureExtractor"] == "feature_extraction_dasheng.DashengFeatureExtractor"
    assert (written["hidden_size"], written["num_hidden_layers"]) == (64, 2)
    assert (written["encoder_kwargs"]["embed_dim"], written["encoder_kwargs"]["depth"]) == (64, 2)  # the mirror
    for name in ("configuration_dasheng.py", "modeling_dasheng.py", "feature_extraction_dasheng.py", "README.md"):
        assert (new / name).is_file()
    assert load_file(new / "model.safetensors").keys() == hf_state_dict(reference).keys()
    assert "not one of the released Dasheng checkpoints" in (new / "README.md").read_text()  # name="dasheng-base"
    audio = concatenated_fsdd(16000 * 2)
    assert max_abs_diff(encode(new, audio), reference_tokens(reference, audio)) < TOLERANCE


def test_model_card_front_matter_scores_and_runnable_usage(tiny, tmp_path: Path) -> None:
    assert main(["--checkpoint", str(tiny[1]), "--output", str(tmp_path / "out")]) == 0
    card = (tmp_path / "out" / "README.md").read_text()
    front_matter = card.split("---")[1]
    for line in ("library_name: transformers", "pipeline_tag: feature-extraction", "- audio"):
        assert line in front_matter
    usage = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    usage = re.sub(r'model_id = ".*"', f"model_id = {str(tmp_path / 'out')!r}", usage)
    namespace: dict = {}
    exec(usage, namespace)
    assert namespace["outputs"].pooler_output.shape == (1, 64)

    sizes = {
        "dasheng-base": "80.2 | 72.5 | 84.0",
        "dasheng-0.6B": "82.4 | 74.9 | 84.0",
        "dasheng-1.2B": "83.2 | 75.7 | 84.9",
    }
    for name, scores in sizes.items():
        assert scores in build_model_card(DashengConfig.from_preset(name), False, f"mispeech/{name}", name)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_url_is_downloaded_once_and_cached(tiny, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    for proxy in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
    handler = functools.partial(_QuietHandler, directory=str(tiny[1].parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/{tiny[1].name}?download=1"
    try:
        assert main(["--checkpoint", url, "--output", str(tmp_path / "out")]) == 0
        missing = url.replace(tiny[1].name, "missing.pt")
        assert main(["--checkpoint", missing, "--output", str(tmp_path / "out2")]) == 1
        assert "Could not download" in capsys.readouterr().err
    finally:
        server.shutdown()
        server.server_close()
    cache = tmp_path / "torch_home" / "hub" / "checkpoints"
    files = sorted(cache.iterdir())
    assert [path.name.split("-", 1)[1] for path in files] == [tiny[1].name]  # no partial download left
    cached = files[0]  # named by a hash of the full URL, then the file name
    assert cached.read_bytes() == tiny[1].read_bytes()
    # The server is gone: the second conversion must use the cache.
    assert main(["--checkpoint", url, "--output", str(tmp_path / "again")]) == 0
    assert f"Using cached {cached}" in capsys.readouterr().out
    audio = concatenated_fsdd(16000)
    assert max_abs_diff(encode(tmp_path / "again", audio), reference_tokens(tiny[0], audio)) < TOLERANCE


def test_a_downloaded_page_that_is_no_checkpoint_says_how_to_fetch_again(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    for proxy in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "model.pt").write_text("<html><body>Please log in to download</body></html>")
    handler = functools.partial(_QuietHandler, directory=str(tmp_path / "site"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/model.pt"
        line = run_failing(["--checkpoint", url, "--output", str(tmp_path / "out")], capsys, tmp_path)
    finally:
        server.shutdown()
        server.server_close()
    (cached,) = (tmp_path / "torch_home" / "hub" / "checkpoints").iterdir()
    assert "is a text file, not a PyTorch checkpoint" in line
    assert line.endswith(f"It was downloaded earlier: delete {cached} to fetch it again.")


def test_push_to_hub_offline_fails_before_any_work(tiny, tmp_path: Path, capsys) -> None:
    args = ["--checkpoint", str(tiny[1]), "--output", str(tmp_path / "out"), "--push-to-hub", "someone/dasheng-tiny"]
    assert main(args) == 1
    line = error_line(capsys.readouterr().err)
    assert "Cannot push to someone/dasheng-tiny: HF_HUB_OFFLINE is set" in line and "hf upload" in line
    assert not (tmp_path / "out").exists()


def test_push_that_fails_late_keeps_the_folder(tiny, tmp_path: Path, capsys, monkeypatch) -> None:
    """Online with a token, but the Hub refuses the connection: the converted folder stays, with how to upload it."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    args = ["--checkpoint", str(tiny[1]), "--output", str(tmp_path / "out"), "--push-to-hub", "someone/dasheng-tiny"]
    assert main(args) == 1
    assert "Pushing to someone/dasheng-tiny failed" in capsys.readouterr().err
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert 'model_id = "someone/dasheng-tiny"' in (tmp_path / "out" / "README.md").read_text()


def test_command_line_from_the_repository_root(tiny, tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "convert_checkpoint.py", "--checkpoint", str(tiny[1]), "--output", str(tmp_path / "o")]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "o" / "model.safetensors").is_file()

    command = [sys.executable, "-m", "dasheng_hf.convert_checkpoint", "--checkpoint", str(tmp_path / "none.pt")]
    result = subprocess.run(command + ["--output", str(tmp_path / "x")], env=env, capture_output=True, text=True)
    assert result.returncode == 1
    assert "error: Checkpoint" in result.stderr and "does not exist" in result.stderr


# ----------------------------------------------------------------------------------------------------------------
# Bad inputs and outputs: one line, exit 1, nothing left behind (issue 10)
# ----------------------------------------------------------------------------------------------------------------


def run_failing(args: list[str], capsys: pytest.CaptureFixture, parent: Path, name: str = "out") -> str:
    """Run the command line, which must fail with one `error:` line and leave no trace of `name` in `parent`."""
    assert main(args) == 1
    line = error_line(capsys.readouterr().err)
    assert_left_nothing(parent, name)
    return line


def _zip_member_offset(path: Path, member_suffix: str) -> int:
    """Where the data of the zip member ending with `member_suffix` starts in the file."""
    with zipfile.ZipFile(path) as archive:
        info = next(info for info in archive.infolist() if info.filename.endswith(member_suffix))
    raw = path.read_bytes()
    name_length, extra_length = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
    return info.header_offset + 30 + name_length + extra_length


def _damaged_bytes(kind: str, checkpoint: Path, tmp_path: Path) -> bytes:
    data = checkpoint.read_bytes()
    if kind == "truncated":
        return data[: len(data) // 2]
    if kind == "truncated legacy format":
        legacy = tmp_path / "legacy.pt"
        torch.save(torch.load(checkpoint, weights_only=True), legacy, _use_new_zipfile_serialization=False)
        return legacy.read_bytes()[:3000]
    if kind == "flipped tensor byte":
        flipped = bytearray(data)
        flipped[_zip_member_offset(checkpoint, "data/0") + 5] ^= 0x40
        return bytes(flipped)
    if kind == "random bytes":
        return bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).tolist())
    if kind == "random pickle header":
        return b"\x80\x02" + bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(1)).tolist())
    if kind == "pickle protocol 4":
        return pickle.dumps({"model": {"a": [1, 2]}}, protocol=4)
    if kind == "gzip":
        return gzip.compress(data)
    if kind == "json":
        return json.dumps({"model": {}, "config": {}}).encode()
    if kind == "text":
        return b"just some text that was named .pt\n"
    if kind == "safetensors":
        save_file({"a": torch.ones(3)}, tmp_path / "x.safetensors")
        return (tmp_path / "x.safetensors").read_bytes()
    assert kind == "empty"
    return b""


@pytest.mark.parametrize(
    "kind,message",
    [
        ("truncated", "is damaged or not a PyTorch checkpoint (its zip structure is broken"),
        ("truncated legacy format", "is damaged or not a PyTorch checkpoint"),
        ("flipped tensor byte", "the checksum of tiny/data/0 does not match its data"),
        ("random bytes", "neither a zip archive nor a pickle"),
        ("random pickle header", "is damaged or not a PyTorch checkpoint"),
        ("pickle protocol 4", "is damaged or not a PyTorch checkpoint"),
        ("gzip", "it starts with bytes 1f 8b"),
        ("json", "is a JSON file, not a PyTorch checkpoint"),
        ("text", "is a text file, not a PyTorch checkpoint"),
        ("safetensors", "is a safetensors file, not a PyTorch checkpoint: pass the folder"),
        ("empty", "is empty (0 bytes)"),
    ],
)
def test_damaged_or_foreign_files_are_named_as_such_not_as_code(tiny, tmp_path: Path, capsys, kind, message) -> None:
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(_damaged_bytes(kind, tiny[1], tmp_path))
    line = run_failing(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "out")], capsys, tmp_path)
    assert message in line and "arbitrary code" not in line


def test_a_fifo_or_a_folder_as_checkpoint_is_refused_without_blocking(tmp_path: Path, capsys) -> None:
    fifo = tmp_path / "pipe.pt"
    os.mkfifo(fifo)
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(main(["--checkpoint", str(fifo), "--output", "o"])))
    thread.start()
    thread.join(timeout=60)
    if thread.is_alive():  # release the blocked open() before failing
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert result == [1]
    assert "is a named pipe (FIFO), not a regular file" in error_line(capsys.readouterr().err)

    (tmp_path / "folder").mkdir()
    line = run_failing(["--checkpoint", str(tmp_path / "folder"), "--output", str(tmp_path / "out")], capsys, tmp_path)
    assert "is not a Hub-layout folder: it needs config.json" in line


@pytest.fixture
def hub_folder(tiny, tmp_path: Path) -> Path:
    """A folder in the current Hub layout (config.json and model.safetensors) holding the tiny encoder."""
    folder = tmp_path / "hub"
    folder.mkdir()
    config = {"model_type": "dasheng", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    (folder / "config.json").write_text(json.dumps(config))
    save_file(hf_state_dict(tiny[0]), folder / "model.safetensors")
    return folder


def _break_hub_folder(folder: Path, kind: str) -> None:
    weights = folder / "model.safetensors"
    if kind == "truncated safetensors":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif kind == "garbage safetensors":
        weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header at all")
    elif kind == "invalid config.json":
        (folder / "config.json").write_text('{"hidden_size": 64,')
    elif kind == "config.json not an object":
        (folder / "config.json").write_text("[64, 2, 4]")
    elif kind == "config.json a FIFO":
        (folder / "config.json").unlink()
        os.mkfifo(folder / "config.json")
    elif kind == "zero heads":
        (folder / "config.json").write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 0}))
    elif kind == "index without weight_map":
        weights.unlink()
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 1}}))
    elif kind == "index naming a missing shard":
        weights.rename(folder / "model-00001-of-00002.safetensors")
        weight_map = {"encoder.cls_token": "model-00001-of-00002.safetensors", "x": "model-00002-of-00002.safetensors"}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    elif kind == "index naming a shard outside":
        weights.unlink()
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "../model.pt"}}))
    elif kind == "preprocessor disagrees":
        (folder / "preprocessor_config.json").write_text(json.dumps({"hop_size": 320, "sampling_rate": 16000}))
    else:
        assert kind == "preprocessor invalid"
        (folder / "preprocessor_config.json").write_text(json.dumps({"n_fft": "x"}))


@pytest.mark.parametrize(
    "kind,message",
    [
        ("truncated safetensors", "model.safetensors is damaged or not a safetensors file"),
        ("garbage safetensors", "model.safetensors is damaged or not a safetensors file"),
        ("invalid config.json", "config.json is not valid JSON (Expecting property name"),
        ("config.json not an object", "config.json holds a JSON list; it must be an object"),
        ("config.json a FIFO", "config.json is a named pipe (FIFO), not a regular file"),
        ("zero heads", "num_attention_heads"),
        ("index without weight_map", "has no `weight_map` object"),
        ("index naming a missing shard", "names shard files that are not in"),
        ("index naming a shard outside", "names shards that are not file names inside the folder: '../model.pt'."),
        ("preprocessor disagrees", "config has hop_length=160, the feature extractor hop_size=320"),
        ("preprocessor invalid", "preprocessor_config.json cannot be used: n_fft"),
    ],
)
def test_broken_hub_folders_get_one_clear_line(hub_folder: Path, tmp_path: Path, capsys, kind, message) -> None:
    _break_hub_folder(hub_folder, kind)
    line = run_failing(["--checkpoint", str(hub_folder), "--output", str(tmp_path / "out")], capsys, tmp_path)
    assert message in line


@pytest.mark.parametrize(
    "config,message",
    [
        ({"hop_size": 0}, "hop_length"),
        ({"top_db": "x"}, "top_db='x' (expected a number or None)"),
        ({"center": "no"}, "center='no' (expected true or false)"),
        ({"patch_stride": "x"}, "patch_stride='x' (expected an integer or a pair of integers)"),
        ({"n_fft": -512}, "n_fft"),
        ({"f_max": 12000.0}, "f_max"),
        ({"drop_rate": 1.5}, "hidden_dropout_prob"),
        ({"num_heads": 0}, "num_attention_heads"),
        ({"num_heads": 3}, "divisible"),
        ({"target_length": torch.tensor(1008)}, "target_length=tensor(1008) (expected an integer)"),
        ({5: "x"}, "keys that are not strings: 5."),
    ],
)
def test_config_values_are_validated_before_anything_is_written(
    tiny, tmp_path: Path, monkeypatch, capsys, config, message
) -> None:
    def must_not_stage(*args, **kwargs):
        raise AssertionError("a staging folder was created for an invalid config")

    monkeypatch.setattr(convert_checkpoint, "_stage_and_claim", must_not_stage)
    torch.save({"model": tiny[0].state_dict(), "config": {"num_heads": 4, **config}}, tmp_path / "c.pt")
    line = run_failing(["--checkpoint", str(tmp_path / "c.pt"), "--output", str(tmp_path / "out")], capsys, tmp_path)
    assert message in line


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda state: state["blocks.0.mlp.fc1.weight"].view(-1)[:3].fill_(float("nan")), "fc1.weight has 3 NaN"),
        (lambda state: state["init_bn.1.running_var"].view(-1)[0].fill_(-1.0), "running_var has negative variances"),
        (lambda state: state.update(norm_weight=state.pop("norm.weight").long()), "unexpected"),
        (lambda state: state.__setitem__("norm.weight", state["norm.weight"].long()), "has dtype torch.int64"),
    ],
)
def test_bad_tensor_values_are_refused_with_their_names(tiny, tmp_path: Path, capsys, change, message) -> None:
    state = {key: value.clone() for key, value in tiny[0].state_dict().items()}
    change(state)
    torch.save({"model": state, "config": {"num_heads": 4}}, tmp_path / "c.pt")
    line = run_failing(["--checkpoint", str(tmp_path / "c.pt"), "--output", str(tmp_path / "out")], capsys, tmp_path)
    assert message in line


def test_float64_and_float16_checkpoints_convert_to_the_same_numbers(tiny, tmp_path: Path) -> None:
    reference = tiny[0]
    for dtype in (torch.float64, torch.float16):
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in reference.state_dict().items()}
        torch.save({"model": state, "config": {"num_heads": 4}}, tmp_path / f"{dtype}.pt")
        assert main(["--checkpoint", str(tmp_path / f"{dtype}.pt"), "--output", str(tmp_path / str(dtype))]) == 0
        written = load_file(tmp_path / str(dtype) / "model.safetensors")
        for key, value in hf_state_dict(reference).items():
            expected = value.to(dtype).to(value.dtype) if value.is_floating_point() else value
            assert torch.equal(written[key], expected), key


def test_output_paths_that_cannot_be_written_are_refused_first(tiny, tmp_path: Path, capsys) -> None:
    (tmp_path / "file").write_text("not a folder")
    line = run_failing(["--checkpoint", str(tiny[1]), "--output", str(tmp_path / "file" / "out")], capsys, tmp_path)
    assert line.endswith(
        f"Cannot create {tmp_path / 'file' / 'out'}: {tmp_path / 'file'} is a file, not a folder. "
        "Choose another output path."
    )
    line = run_failing(["--checkpoint", str(tiny[1]), "--output", str(tmp_path / "file")], capsys, tmp_path, "x")
    assert "is a file; pass a folder path" in line
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    line = run_failing(["--checkpoint", str(tiny[1]), "--output", str(tmp_path / "link")], capsys, tmp_path, "x")
    assert "is a symbolic link" in line
    assert list((tmp_path / "target").iterdir()) == []
    line = run_failing(["--checkpoint", str(tiny[1]), "--output", "/"], capsys, tmp_path)
    assert "does not name a folder" in line
    (tmp_path / "new\nline").write_text("a file whose name holds a newline")
    line = run_failing(["--checkpoint", str(tiny[1]), "--output", str(tmp_path / "new\nline")], capsys, tmp_path, "x")
    assert line.endswith("new\\nline is a file; pass a folder path.")  # still one line


def test_usage_errors_and_bad_label_files_are_one_line(tiny, classifier, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(tiny[1])])
    assert exit_info.value.code == 2
    assert error_line(capsys.readouterr().err) == (
        "dasheng-convert: error: the following arguments are required: --output (see dasheng-convert --help)"
    )
    binary = tmp_path / "labels.csv"
    binary.write_bytes(b"\xff\xfe\x00garbage\x00")
    args = ["--checkpoint", str(classifier[2]), "--output", str(tmp_path / "out"), "--labels", str(binary)]
    assert "is not a UTF-8 CSV file" in run_failing(args, capsys, tmp_path)
    os.mkfifo(tmp_path / "fifo.csv")
    args[-1] = str(tmp_path / "fifo.csv")
    line = run_failing(args, capsys, tmp_path)
    assert "labels CSV" in line and "is a named pipe (FIFO)" in line


def _occupy(output: Path, what: str) -> None:
    """Another process puts something at the output path while the conversion runs."""
    if what == "a folder":
        output.mkdir()
        (output / "theirs.txt").write_text("another conversion")
    elif what == "a file":
        output.write_text("another process's file")
    else:
        output.mkdir()  # an empty folder may be replaced, as at the start


@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "portable"])
@pytest.mark.parametrize("what", ["a folder", "a file", "an empty folder"])
def test_an_output_that_appears_meanwhile_is_kept_and_so_is_the_conversion(
    tiny, tmp_path: Path, monkeypatch, capsys, renameat2, what
) -> None:
    if not renameat2:
        monkeypatch.setattr(output_folder, "_renameat2", lambda *args: False)
    output = tmp_path / "out"
    card = convert_checkpoint.build_model_card

    def meanwhile(*args):
        _occupy(output, what)
        return card(*args)

    monkeypatch.setattr(convert_checkpoint, "build_model_card", meanwhile)
    status = main(["--checkpoint", str(tiny[1]), "--output", str(output)])
    if what == "an empty folder":
        assert status == 0 and (output / "model.safetensors").is_file()
        assert [path.name for path in tmp_path.iterdir()] == ["out"]
        return
    assert status == 1
    line = error_line(capsys.readouterr().err)
    assert "appeared while converting (another process?) and --overwrite was not given" in line
    if what == "a folder":
        assert [path.name for path in output.iterdir()] == ["theirs.txt"]
    else:
        assert output.read_text() == "another process's file"
    kept = [path for path in tmp_path.iterdir() if path.name != "out"]
    assert len(kept) == 1 and kept[0].name.startswith("out.converted-") and f"kept at {kept[0]}." in line
    audio = concatenated_fsdd(16000)
    assert max_abs_diff(encode(kept[0], audio), reference_tokens(tiny[0], audio)) < TOLERANCE


@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "portable"])
def test_overwrite_keeps_the_previous_folder_when_the_final_rename_fails(
    tiny, tmp_path: Path, monkeypatch, capsys, renameat2
) -> None:
    output = tmp_path / "out"
    output.mkdir()
    (output / "old.txt").write_text("previous conversion")
    failure = OSError(errno.EIO, os.strerror(errno.EIO), "rename")
    if renameat2:

        def exchange_fails(source, target, flags):
            raise failure

        monkeypatch.setattr(output_folder, "_renameat2", exchange_fails)
    else:
        real = output_folder._rename_noreplace

        def staging_cannot_move(source: Path, target: Path) -> None:
            if source.name.startswith(".out.partial-"):
                raise failure
            real(source, target)

        monkeypatch.setattr(output_folder, "_renameat2", lambda *args: False)
        monkeypatch.setattr(output_folder, "_rename_noreplace", staging_cannot_move)
    assert main(["--checkpoint", str(tiny[1]), "--output", str(output), "--overwrite"]) == 1
    line = error_line(capsys.readouterr().err)
    assert line.startswith("error: Could not write the converted folder (Input/output error")
    assert [path.name for path in tmp_path.iterdir()] == ["out"]
    assert [path.name for path in output.iterdir()] == ["old.txt"]


# Converts with a model card step that announces itself and waits, so a signal arrives mid-conversion.
_SLOW_CONVERSION = """
import sys, time
from dasheng_hf import convert_checkpoint
card = convert_checkpoint.build_model_card
def slow_card(*args):
    print("staged", flush=True)
    time.sleep(120)
    return card(*args)
convert_checkpoint.build_model_card = slow_card
sys.exit(convert_checkpoint.main(sys.argv[1:]))
"""


def test_sigterm_mid_conversion_cleans_up_like_ctrl_c(tiny, tmp_path: Path) -> None:
    output = tmp_path / "out"
    output.mkdir()
    (output / "old.txt").write_text("previous conversion")
    command = [sys.executable, "-c", _SLOW_CONVERSION, "--checkpoint", str(tiny[1]), "--output", str(output)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        command + ["--overwrite"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        while (line := process.stdout.readline()) and line.strip() != "staged":
            pass
        assert line.strip() == "staged", process.stderr.read()
        assert any(path.name.startswith(".out.partial-") for path in tmp_path.iterdir())  # mid-conversion indeed
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM
    assert error_line(stderr) == "error: interrupted by SIGTERM; no partial output was left."
    assert [path.name for path in tmp_path.iterdir()] == ["out"]
    assert [path.name for path in output.iterdir()] == ["old.txt"]


# Runs several conversions in one process and prints [exit status, stderr] of each as JSON.
_RUN_ALL = """
import contextlib, io, json, sys
from dasheng_hf.convert_checkpoint import main
results = []
for args in json.loads(sys.argv[1]):
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        results.append([main(args), stderr.getvalue()])
print(json.dumps(results))
"""


def _drop_file_permission_override() -> None:
    """In the child: give up CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, so root obeys file permissions too."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP: the capability is gone after exec
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_permission_denied_outputs_are_one_line(tiny, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    unreadable = tmp_path / "unreadable"
    unreadable.mkdir()
    (unreadable / "old.txt").write_text("previous")
    cases = [
        (["--output", str(locked / "out")], f"permission denied in {locked}"),
        (["--output", str(locked / "new" / "out")], f"permission denied in {locked}"),
        (["--output", str(unreadable), "--overwrite"], f"Cannot read the output folder {unreadable}: Permission"),
    ]
    locked.chmod(0o555)
    unreadable.chmod(0o000)
    arguments = json.dumps([["--checkpoint", str(tiny[1]), *args] for args, _ in cases])
    preexec = _drop_file_permission_override if os.geteuid() == 0 else None
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    try:
        try:
            result = subprocess.run(
                [sys.executable, "-c", _RUN_ALL, arguments], preexec_fn=preexec, env=env, capture_output=True, text=True
            )
        except subprocess.SubprocessError as error:
            pytest.skip(f"root cannot give up CAP_DAC_OVERRIDE here (needs CAP_SETPCAP): {error}")
        assert result.returncode == 0, result.stderr
        for (status, stderr), (_, message) in zip(json.loads(result.stdout.splitlines()[-1]), cases):
            assert status == 1 and message in error_line(stderr)
    finally:
        locked.chmod(0o755)
        unreadable.chmod(0o755)
    assert [path.name for path in locked.iterdir()] == []
    assert [path.name for path in unreadable.iterdir()] == ["old.txt"]


def test_read_only_file_system_is_one_line(tiny, tmp_path: Path) -> None:
    mount_point = tmp_path / "ro"
    mount_point.mkdir()
    convert = f"{sys.executable} -m dasheng_hf.convert_checkpoint --checkpoint {tiny[1]} --output {mount_point}/out"
    script = f"mount -t tmpfs -o ro tmpfs {mount_point} || exit 77; exec {convert}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # A private mount namespace: as root with CAP_SYS_ADMIN, or as the mapped root of a new user namespace.
    for prefix in (["unshare", "--mount"], ["unshare", "--user", "--map-root-user", "--mount"]):
        try:
            result = subprocess.run([*prefix, "sh", "-c", script], env=env, capture_output=True, text=True)
        except FileNotFoundError:
            break
        if "error:" in result.stderr:
            assert result.returncode == 1
            assert error_line(result.stderr).endswith(
                f"Cannot write {mount_point}/out: {mount_point} is on a read-only file system."
            )
            return
    pytest.skip("no read-only mount can be made here: needs `unshare` with CAP_SYS_ADMIN or user namespaces")
