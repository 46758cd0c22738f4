"""
dasheng-pretrain under fault injection and bad input: real child processes stopped by SIGINT, SIGTERM, SIGHUP and
SIGKILL while a checkpoint is being saved, then resumed with `last` and compared with an uninterrupted run; one run
per output folder; damaged, foreign or incomplete checkpoints; flags checked before any work; the short `--help`.
"""

from __future__ import annotations

import ast
import json
import logging
import shutil
import signal
from pathlib import Path

import pytest
import torch
import transformers
from dasheng_hf.audio.make_shards import make_shards
from dasheng_hf.jobs.lock import LOCK_NAME
from dasheng_hf.pretraining.pretrain import main
from fault_injection import SIGNALS, start
from helpers import fsdd_files
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
MODULE = "dasheng_hf.pretraining.pretrain"
TINY = (
    "hidden_size=32,num_hidden_layers=1,num_attention_heads=2,"
    "decoder_hidden_size=32,decoder_num_hidden_layers=1,decoder_num_attention_heads=2"
)
STEPS, SAVE_EVERY = 6, 2


@pytest.fixture(scope="module", autouse=True)
def _one_thread_and_restored_logging():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    verbosity = transformers.utils.logging.get_verbosity()
    level = logging.getLogger("dasheng_hf").level
    yield
    transformers.utils.logging.set_verbosity(verbosity)
    transformers.utils.logging.reset_format()
    logging.getLogger("dasheng_hf").setLevel(level)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("shards")
    (root / "list.csv").write_text("filename\n" + "".join(f"{path}\n" for path in fsdd_files()[::25]))
    return make_shards(root / "list.csv", root / "shards", shard_size=20, num_workers=1, progress=False)


def args(shards: str, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--train_data", shards, "--config_name", "dasheng-base", "--config_overrides", TINY,
        "--crop_seconds", "0.5", "--shuffle_buffer", "8", "--max_steps", str(STEPS),
        "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--logging_steps", "1",
        "--save_steps", str(SAVE_EVERY), "--output_dir", str(output_dir), "--disable_tqdm", "true",
        "--report_to", "none", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory) -> Path:
    """An uninterrupted run."""
    output_dir = tmp_path_factory.mktemp("reference") / "out"
    main(args(shards, output_dir))
    return output_dir


def losses(output_dir: Path) -> dict[int, float]:
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


def assert_same_run(output_dir: Path, reference: Path) -> None:
    assert losses(output_dir).keys() == losses(reference).keys()
    for step, loss in losses(output_dir).items():
        assert abs(loss - losses(reference)[step]) <= 1e-4 * abs(loss), (step, loss, losses(reference)[step])
    found, expected = load_file(output_dir / "model.safetensors"), load_file(reference / "model.safetensors")
    for key, value in expected.items():
        torch.testing.assert_close(found[key], value, rtol=1e-4, atol=1e-5, msg=key)


def error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dasheng-pretrain:")]
    assert len(lines) == 1, lines
    return lines[0]


def test_interrupted_saves_leave_a_resumable_run_equal_to_an_uninterrupted_one(shards, reference, tmp_path, caplog):
    outcomes = []
    for name in SIGNALS:
        for attempt in range(3):
            output_dir = tmp_path / f"{name}-{attempt}"
            # Stopped while saving the second checkpoint (checkpoint-4): its weights written, the rest not yet.
            run = start(MODULE, args(shards, output_dir), tmp_path / f"{name}-{attempt}.log", "checkpoint-save:2")
            status = run.stop_at("checkpoint-save", SIGNALS[name])
            text = run.text()
            assert "Traceback" not in text, text[-3000:]
            if name == "SIGKILL":
                assert status == -signal.SIGKILL and not (output_dir / "checkpoint-4" / "trainer_state.json").exists()
                assert (output_dir / LOCK_NAME).exists()  # a dead run's lock, taken over below
            else:
                last = text.strip().splitlines()[-1]
                assert status == 130 and last == (
                    f"dasheng-pretrain: interrupted ({name}) at step 4; the newest complete checkpoint is "
                    f"{output_dir}/checkpoint-4 (continue with --resume_from_checkpoint last)."
                ), last
                assert not (output_dir / LOCK_NAME).exists()
            caplog.clear()
            main(args(shards, output_dir, "--resume_from_checkpoint", "last"))  # the second run on the folder
            error = caplog.text
            if name == "SIGKILL":
                assert "Skipping " + str(output_dir / "checkpoint-4") + ": it has no trainer_state.json" in error
                assert "took over" in error and "which is no longer running" in error
            assert_same_run(output_dir, reference)
            outcomes.append((name, "resumed from " + ("checkpoint-2" if name == "SIGKILL" else "checkpoint-4")))
    assert len(outcomes) == 12


def test_one_run_per_output_folder(shards, tmp_path, capsys):
    output_dir = tmp_path / "shared"
    first = start(MODULE, args(shards, output_dir), tmp_path / "first.log", "checkpoint-save:1")
    assert first.wait_for("DASHENG_FAULT_POINT checkpoint-save ")
    with pytest.raises(SystemExit) as exit_info:
        main(args(shards, output_dir))
    assert exit_info.value.code == 2
    line = error_line(capsys)
    assert f"in use by process {first.process.pid}" in line and "one run per output folder" in line, line
    first.process.kill()
    first.finish()
    assert sorted(path.name for path in output_dir.iterdir() if path.name.startswith("checkpoint")) == ["checkpoint-2"]


@pytest.mark.parametrize(
    "damage,message",
    [
        ("truncate optimizer.pt", "optimizer.pt (optimizer state) is damaged or truncated"),
        ("truncate model.safetensors", "model.safetensors is damaged or truncated"),
        ("garbage rng_state.pth", "rng_state.pth (random number generator state) is damaged or truncated"),
        ("garbage scheduler.pt", "scheduler.pt (learning-rate schedule state) is damaged or truncated"),
        ("break trainer_state.json", "its trainer_state.json is unreadable"),
        ("remove optimizer.pt", "has no optimizer.pt (optimizer state); pass --allow_missing_optimizer_state"),
        ("another config", "holds another model ("),
    ],
)
def test_a_damaged_or_foreign_checkpoint_is_one_error_naming_the_file(
    damage, message, shards, reference, tmp_path, capsys
):
    checkpoint = tmp_path / "out" / "checkpoint-2"
    shutil.copytree(reference / "checkpoint-2", checkpoint)
    action, name = damage.split(" ", 1)
    if action == "truncate":
        (checkpoint / name).write_bytes((checkpoint / name).read_bytes()[:1000])
    elif action == "garbage":
        (checkpoint / name).write_bytes(b"\x00garbage" * 64)
    elif action == "break":
        (checkpoint / name).write_text('{"global_step": 2, "log_hist')
    elif action == "remove":
        (checkpoint / name).unlink()
    extra = ["--config_overrides", TINY.replace("hidden_size=32,", "hidden_size=64,", 1)] if name == "config" else []
    with pytest.raises(SystemExit) as exit_info:
        main([*args(shards, tmp_path / "out", "--resume_from_checkpoint", str(checkpoint)), *extra])
    assert exit_info.value.code == 2
    line = error_line(capsys)
    assert message in line, line
    assert "Traceback" not in line


def test_a_missing_optimizer_state_is_accepted_when_asked_for(shards, reference, tmp_path, caplog):
    checkpoint = tmp_path / "out" / "checkpoint-4"
    shutil.copytree(reference / "checkpoint-4", checkpoint)
    (checkpoint / "optimizer.pt").unlink()
    main(args(shards, tmp_path / "out", "--resume_from_checkpoint", "last", "--allow_missing_optimizer_state"))
    assert "has no optimizer.pt: the optimizer state starts fresh" in caplog.text
    assert sorted(losses(tmp_path / "out")) == list(range(1, STEPS + 1))


@pytest.mark.parametrize(
    "flags,expected",
    [
        (["--crop_seconds", "nan"], "--crop_seconds must be a number of seconds from 0.03 to 600"),
        (["--crop_seconds", "inf"], "--crop_seconds must be a number of seconds from 0.03 to 600"),
        (["--crop_seconds", "1e9"], "--crop_seconds must be a number of seconds from 0.03 to 600"),
        (["--gain_augmentation_db", "inf"], "--gain_augmentation_db must lie within -60..60 dB"),
        (["--gain_augmentation_db", "1e6"], "--gain_augmentation_db must lie within -60..60 dB"),
        (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be at least 1"),
        (["--max_steps", "-5"], "--max_steps must be positive, got -5"),
        (["--learning_rate", "nan"], "--learning_rate must be a finite positive number"),
        (["--mask_ratio", "nan"], "--mask_ratio must lie strictly between 0 and 1"),
        (["--output_dir", "{file}"], "is a file, not a folder"),
        (["--output_dir", "{file}/under"], "is a file, not a folder"),
        (["--config_name", "./no/such/folder"], "--config_name './no/such/folder' does not exist (no such file"),
        (["--config_name", "dasheng-base", "--model_name_or_path", "./missing"], "either --model_name_or_path"),
        (["--config_name", "", "--model_name_or_path", "./missing"], "'./missing' does not exist (no such file"),
    ],
)
def test_every_flag_is_checked_before_work_with_one_line(flags, expected, shards, tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    flags = [flag.format(file=tmp_path / "file") for flag in flags]
    with pytest.raises(SystemExit) as exit_info:
        main([*args(shards, tmp_path / "out"), *flags])
    assert exit_info.value.code == 2
    assert expected in error_line(capsys)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["file"]  # no output folder left behind


def test_continuing_from_an_encoder_says_once_that_the_decoder_starts_fresh(shards, tmp_path, capsys, caplog):
    from dasheng_hf import DashengConfig, DashengModel

    config = DashengConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    DashengModel(config).save_pretrained(tmp_path / "encoder")
    output = tmp_path / "out"
    main([*args(shards, output), "--config_name", "", "--model_name_or_path", str(tmp_path / "encoder"),
          "--max_steps", "1", "--save_steps", "10"])  # fmt: skip
    captured = capsys.readouterr()
    text = captured.out + captured.err + caplog.text
    assert text.count("The decoder starts fresh") == 1 and "decoder tensors" in text
    assert "missing" not in text.lower() and '"hidden_size"' not in text  # no key table, no config dump
    with pytest.raises(SystemExit):
        main([*args(shards, tmp_path / "o2"), "--config_name", "", "--model_name_or_path", "mispeech/dasheng-base"])
    line = error_line(capsys)
    assert "not in the local Hugging Face cache" in line and "pass a local folder" in line and "Hub id" not in line


def test_help_lists_dashengs_flags_first_then_the_common_trainer_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    text = capsys.readouterr().out
    assert exit_info.value.code == 0 and len(text.splitlines()) < 120
    body = text[text.index("Dasheng: model") :]  # after the usage line
    assert body.index("--train_data") < body.index("--crop_seconds") < body.index("Trainer: the common flags")
    assert body.index("Trainer: the common flags") < body.index("--output_dir DIR")
    assert "--allow_missing_optimizer_state" in text and "--help-all" in text
    with pytest.raises(SystemExit):
        main(["--help-all"])
    full = capsys.readouterr().out
    assert full.index("Dasheng: model") < full.index("Dasheng: data") < full.index("Trainer (TrainingArguments")
    assert full.index("--train_data") < full.index("--per_device_train_batch_size") and "--adam_beta1" in full


@pytest.mark.parametrize(
    "module",
    ["pretraining/pretrain.py", "pretraining/arguments.py", "audio/make_shards.py", "jobs/lock.py",
     "jobs/interrupts.py"],
)  # fmt: skip
def test_the_help_path_imports_neither_torch_nor_transformers(module):
    """The command modules import torch, transformers and numpy only inside functions, after parsing."""
    tree = ast.parse((REPO / module).read_text())
    heavy = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            heavy |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            heavy.add((node.module or "").split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.module and node.level > 0:
            target = (REPO / module).parent.joinpath(*[".."] * (node.level - 1), *node.module.split("."))
            assert not str(target).endswith(("trainer", "training_arguments", "datasets", "decoding", "sources")), (
                f"{module} imports {node.module} at the top"
            )
    assert not heavy & {"torch", "transformers", "numpy"}, heavy


def test_bf16_on_a_cpu_without_bf16_instructions_is_warned_about_in_one_line(shards, tmp_path, caplog):
    from dasheng_hf.cli.preflight import cpu_has_native_bf16
    from dasheng_hf.pretraining.arguments import DashengDataArguments, DashengModelArguments
    from dasheng_hf.pretraining.trainer import check_training_flags
    from dasheng_hf.pretraining.training_arguments import DashengPretrainingArguments, DashengPretrainingParser

    parser = DashengPretrainingParser((DashengModelArguments, DashengDataArguments, DashengPretrainingArguments))
    parsed = parser.parse_args_into_dataclasses([*args(shards, tmp_path / "out"), "--bf16", "true", "--use_cpu"])
    with caplog.at_level(logging.WARNING, logger="dasheng_hf"):
        check_training_flags(*parsed)
    warned = [record.message for record in caplog.records if "bf16" in record.message]
    if cpu_has_native_bf16() is False and not torch.cuda.is_available():
        assert len(warned) == 1 and "emulated" in warned[0] and "\n" not in warned[0]
    else:
        assert warned == []
