"""`dasheng-pretrain`: the loss falls on one and two processes, resuming continues the same curve, the
exported encoder loads with `AutoModel`, bad files are skipped and counted, bad inputs stop with one line."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
import transformers
from dasheng_hf import DashengModel
from dasheng_hf.audio.make_shards import make_shards
from dasheng_hf.pretraining.pretrain import (
    DashengDataArguments,
    DashengModelArguments,
    DashengPretrainingArguments,
    DashengPretrainingCollator,
    DashengPretrainingError,
    DashengPretrainingParser,
    build_model,
    main,
    parse_config_overrides,
)
from helpers import fsdd_clip, fsdd_files
from safetensors.torch import load_file

TINY = (
    "hidden_size=64,num_hidden_layers=2,num_attention_heads=4,"
    "decoder_hidden_size=32,decoder_num_hidden_layers=1,decoder_num_attention_heads=2"
)
STEPS, SAVE_EVERY, LOG_EVERY = 60, 30, 5


@pytest.fixture(scope="module", autouse=True)
def _one_thread_and_restored_logging():
    """
    One intra-op thread: for a 64-wide model, a second one only adds synchronisation (20x slower steps on a busy
    CPU). `main` sets up logging as a command does (Transformers at info level); later test files get theirs back.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    verbosity = transformers.utils.logging.get_verbosity()
    levels = {name: logging.getLogger(name).level for name in ("dasheng_hf", "dasheng_hf.audio.datasets")}
    yield
    transformers.utils.logging.set_verbosity(verbosity)
    transformers.utils.logging.reset_format()
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    """200 FSDD recordings (8 kHz, both speakers, every digit) in 4 shards; returns their brace pattern."""
    root = tmp_path_factory.mktemp("shards")
    listing = root / "fsdd.csv"
    listing.write_text("filename\n" + "".join(f"{path}\n" for path in fsdd_files()[::5]))
    return make_shards(listing, root / "shards", shard_size=50, num_workers=1, progress=False)


def _args(train_data: str, output_dir, steps: int = STEPS, *extra: str) -> list[str]:
    return [
        "--train_data", train_data,
        "--config_name", "dasheng-base",
        "--config_overrides", TINY,
        "--crop_seconds", "2",
        "--shuffle_buffer", "32",
        "--max_steps", str(steps),
        "--per_device_train_batch_size", "8",
        "--learning_rate", "1e-3",
        "--logging_steps", str(LOG_EVERY),
        "--save_steps", str(SAVE_EVERY),
        "--output_dir", str(output_dir),
        "--disable_tqdm", "true",
        *extra,
    ]  # fmt: skip


def _history(output_dir) -> list[dict]:
    return json.loads((output_dir / "trainer_state.json").read_text())["log_history"]


def _losses(output_dir) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in _history(output_dir) if "loss" in entry}


def _assert_loss_falls(losses: dict[int, float]) -> None:
    curve = [losses[step] for step in sorted(losses)]
    assert len(curve) >= 6, losses
    assert np.mean(curve[-2:]) < 0.8 * np.mean(curve[:2]), curve


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory):
    """One uninterrupted single-process run, with a checkpoint and an encoder export half way."""
    output_dir = tmp_path_factory.mktemp("run") / "out"
    main(_args(shards, output_dir, STEPS, "--export_every", str(SAVE_EVERY)))
    return output_dir


def test_loss_falls_and_curve_is_kept(trained):
    _assert_loss_falls(_losses(trained))
    assert sorted(_losses(trained)) == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    assert (trained / "checkpoint-60" / "optimizer.pt").is_file() and (trained / "model.safetensors").is_file()


def test_exported_encoder_loads_with_automodel(trained, feature_extractor):
    from transformers import AutoFeatureExtractor, AutoModel

    folder = trained / "encoder"
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__name__ == "DashengModel" and model.config.use_batch_statistics is False
    trained_weights = load_file(trained / "model.safetensors")  # the whole pretraining model at the last step
    exported = model.state_dict()
    assert set(exported) == {key for key in trained_weights if key.startswith("encoder.")}
    for key, value in exported.items():
        torch.testing.assert_close(value, trained_weights[key], rtol=0, atol=0, msg=key)
    extractor = AutoFeatureExtractor.from_pretrained(folder, trust_remote_code=True)
    inputs = extractor(np.zeros(16000, dtype=np.float32) + 0.01, sampling_rate=16000, return_tensors="pt")
    assert model(**inputs).last_hidden_state.shape == (1, 25, 64)
    card = (folder / "README.md").read_text()
    final_loss = _losses(trained)[STEPS]
    assert "shards/fsdd-{000000..000003}.tar" in card and f"Steps: {STEPS} of {STEPS}" in card
    assert f"Final training loss: {final_loss:.4f}" in card
    assert not [path.name for path in trained.iterdir() if path.name.startswith(".encoder")]  # no partial exports


def test_resume_continues_the_same_curve(trained, shards, tmp_path):
    output_dir = tmp_path / "resumed"
    output_dir.mkdir()
    shutil.copytree(trained / f"checkpoint-{SAVE_EVERY}", output_dir / f"checkpoint-{SAVE_EVERY}")
    main(_args(shards, output_dir, STEPS, "--resume_from_checkpoint", "last"))
    resumed, uninterrupted = _losses(output_dir), _losses(trained)
    assert sorted(resumed) == sorted(uninterrupted)
    after = [step for step in resumed if step > SAVE_EVERY]
    np.testing.assert_allclose([resumed[s] for s in after], [uninterrupted[s] for s in after], rtol=1e-4)


def test_two_processes_under_torchrun(shards, tmp_path):
    output_dir = tmp_path / "ddp"
    eval_shard = shards.replace("{000000..000003}", "000003")
    with socket.socket() as probe:  # a free port, so parallel runs do not collide
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    logs = tmp_path / "logs"  # each rank's stdout and stderr in files of their own
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    command += ["--log-dir", str(logs), "--redirects", "3"]
    command += ["-m", "dasheng_hf.pretraining.pretrain", *_args(shards, output_dir, 40, "--eval_data", eval_shard)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    ranks = ["".join(path.read_text() for path in sorted(logs.glob(f"**/attempt_*/{rank}/*.log"))) for rank in (0, 1)]
    output = result.stdout + result.stderr + "".join(ranks)
    assert result.returncode == 0, output[-4000:]
    _assert_loss_falls(_losses(output_dir))
    evaluation = [entry for entry in _history(output_dir) if "eval_loss" in entry]
    assert evaluation and evaluation[-1]["eval_crops"] == 50  # each crop of the eval shard read once, by one process
    assert ranks[0].count("***** Running training *****") == 1
    assert "Running training" not in ranks[1]  # the second process logs nothing of its own
    assert output.count("8-bit AdamW") <= 1
    assert (output_dir / "encoder" / "model.safetensors").is_file()


def test_corrupt_file_is_skipped_and_counted(tmp_path, caplog):
    shard = tmp_path / "mixed-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for path in fsdd_files()[:12]:
            tar.add(path, arcname=os.path.basename(path))
        broken = tmp_path / "broken_take.wav"
        broken.write_bytes(b"RIFF" + os.urandom(2000))
        tar.add(broken, arcname=broken.name)
    output_dir = tmp_path / "out"
    args = _args(str(shard), output_dir, 4, "--eval_data", str(shard), "--logging_steps", "2")
    main([*args, "--per_device_train_batch_size", "4"])
    assert "broken_take" in caplog.text
    history = _history(output_dir)
    assert max(entry.get("skipped_files", 0) for entry in history) >= 1
    assert [entry["eval_skipped_files"] for entry in history if "eval_loss" in entry][-1] == 1
    assert [entry["eval_crops"] for entry in history if "eval_loss" in entry][-1] == 12
    assert "Unreadable files skipped" in (output_dir / "encoder" / "README.md").read_text()


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--train_data", "{tmp}/nothing-{{000000..000003}}.tar", "--max_steps", "5"], "nothing-"),
        (["--train_data", "{tmp}", "--max_steps", "5"], "{tmp}"),  # a folder without audio
        (["--train_data", "{shards}"], "--max_steps"),
        (["--train_data", "{shards}", "--max_steps", "5", "--config_overrides", "hidden_sise=64"], "hidden_sise"),
        (["--train_data", "{shards}", "--max_steps", "5", "--gain_augmentation_db", "loud"], "gain_augmentation_db"),
        (["--train_data", "{shards}", "--max_steps", "5", "--mask_ratio", "1.5"], "mask_ratio"),
        (["--train_data", "{shards}", "--max_steps", "5", "--attn_implementation", "fast"], "attn_implementation"),
        pytest.param(
            ["--train_data", "{shards}", "--max_steps", "5", "--attn_implementation", "flex_attention"],
            "no backward pass on CPUs",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="FlexAttention trains on GPUs"),
        ),
        pytest.param(
            ["--train_data", "{shards}", "--max_steps", "5", "--fsdp"],
            "--fsdp needs GPUs",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="FSDP runs where there are GPUs"),
        ),
        (["--train_data", "{shards}", "--max_steps", "5", "--no_such_flag", "1"], "--no_such_flag"),
        (["--train_data", "{shards}", "--max_steps", "five"], "--max_steps"),
    ],
)
def test_bad_inputs_stop_with_one_line(flags, expected, shards, tmp_path, capsys):
    values = {"tmp": str(tmp_path), "shards": shards}
    flags = [flag.format(**values) for flag in flags]
    with pytest.raises(SystemExit) as exit_info:
        main([*flags, "--output_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "error" in error and expected.format(**values) in error, error
    assert not (tmp_path / "out").exists()  # stopped before training


def test_recipe_defaults_and_dashed_flags():
    parser = DashengPretrainingParser((DashengModelArguments, DashengDataArguments, DashengPretrainingArguments))
    _, data, args = parser.parse_args_into_dataclasses(["--train_data", "x", "--output_dir", "o"])
    assert (args.learning_rate, args.weight_decay, args.lr_scheduler_kwargs) == (3e-4, 0.01, {"min_lr_rate": 0.1})
    assert args.lr_scheduler_type.value == "cosine_with_min_lr" and data.crop_seconds == 10.0
    assert data.gain_augmentation_db is None and data.export_every is None
    if not torch.cuda.is_available():
        assert args.optim.value == "adamw_torch" and args.bf16 is False
    dashed = parser.parse_args_into_dataclasses(["--train-data", "x", "--crop-seconds", "3", "--output-dir", "o"])
    assert dashed[1].train_data == "x" and dashed[1].crop_seconds == 3.0


def test_collator_gain_and_padding(feature_extractor):
    clip = fsdd_clip(0).numpy()
    crop = np.zeros(32000, dtype=np.float32)
    crop[: len(clip)] = clip
    items = [{"audio": crop, "num_samples": len(clip)}, {"audio": crop, "num_samples": 32000}]
    plain = DashengPretrainingCollator(feature_extractor)(items)
    assert plain["input_values"].shape == (2, 64, 201)
    assert plain["attention_mask"].sum(dim=1).tolist() == [len(clip) // 160 + 1, 201]
    louder = DashengPretrainingCollator(feature_extractor, gain_db=(6.0, 6.0))(items)
    real = plain["attention_mask"].bool()[:, None, :].expand_as(plain["input_values"])
    shift = (louder["input_values"] - plain["input_values"])[real]
    # +6 dB everywhere, up to float32 rounding of the power spectrum in quiet bins
    assert abs(float(shift.median()) - 6.0) < 1e-3 and float((shift - 6.0).abs().quantile(0.99)) < 0.02


def test_continue_from_encoder_folder_and_overrides(tmp_path):
    folder = tmp_path / "encoder"
    encoder = DashengModel(build_model(DashengModelArguments(config_overrides=TINY))[0].config)
    encoder.save_pretrained(folder)
    model, extractor, described = build_model(
        DashengModelArguments(model_name_or_path=str(folder), config_overrides="decoder_num_hidden_layers=1")
    )
    for key, value in encoder.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)
    assert model.config.decoder_num_hidden_layers == 1 and model.config.use_batch_statistics is True
    assert str(folder) in described and extractor.sampling_rate == 16000
    assert parse_config_overrides("hidden_size=64,qkv_bias=false,top_db=none,f_max=7600") == {
        "hidden_size": 64,
        "qkv_bias": False,
        "top_db": None,
        "f_max": 7600.0,
    }
    with pytest.raises(DashengPretrainingError, match="either"):
        build_model(DashengModelArguments(model_name_or_path=str(folder), config_name="dasheng-base"))
    eager, _, _ = build_model(DashengModelArguments(model_name_or_path=str(folder), attn_implementation="eager"))
    blocks = [*eager.encoder.blocks, *eager.decoder.blocks]
    assert {block.attn.config._attn_implementation for block in blocks} == {"eager"}


def test_console_script():
    path = shutil.which("dasheng-pretrain")
    assert path, "dasheng-pretrain is not installed: run `pip install -e .`"
    result = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--train_data" in result.stdout and "--per_device_train_batch_size" in result.stdout  # Trainer's flags too


def test_data_without_readable_audio_stops_with_one_line(tmp_path, capsys):
    shard = tmp_path / "broken-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for index in range(3):
            path = tmp_path / f"noise{index}.wav"
            path.write_bytes(b"RIFF" + os.urandom(500))
            tar.add(path, arcname=path.name)
    with pytest.raises(SystemExit) as exit_info:
        main(_args(str(shard), tmp_path / "out", 4))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("dasheng-pretrain: error:") and "no audio" in error, error
