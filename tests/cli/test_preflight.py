"""Checks before any work (`cli/preflight.py`): every missing resource named at once, offline without retries."""

from __future__ import annotations

import socket
import time

import huggingface_hub.constants
import pytest
from dasheng_hf.cli.preflight import (
    DashengPreflightError,
    HubResource,
    check_resources,
    cpu_has_native_bf16,
    new_output_folder,
    warn_if_bf16_is_emulated,
)


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_local_paths_and_cached_repos_pass(tmp_path, empty_cache):
    (empty_cache / "models--mispeech--dasheng-base" / "snapshots" / "abc").mkdir(parents=True)
    check_resources([HubResource("--model", str(tmp_path)), HubResource("--model", "mispeech/dasheng-base")])


def test_offline_reports_every_missing_resource_in_one_line(tmp_path, empty_cache):
    resources = [
        HubResource("--model", "mispeech/dasheng-base"),
        HubResource("--dataset", "ashraq/esc50", kind="dataset"),
        HubResource("--labels", str(tmp_path / "missing" / "labels.csv")),
    ]
    with pytest.raises(DashengPreflightError) as error:
        check_resources(resources, advice="dasheng-convert --checkpoint dasheng-base --output hub/dasheng-base")
    message = str(error.value)
    assert "\n" not in message
    assert (
        "--model 'mispeech/dasheng-base' is not in the local Hugging Face cache, and HF_HUB_OFFLINE is set" in message
    )
    assert "--dataset 'ashraq/esc50' is not in the local Hugging Face cache" in message
    assert f"--labels '{tmp_path / 'missing' / 'labels.csv'}' does not exist (no such file or folder)" in message
    assert message.endswith(
        "pass a local folder or file instead (dasheng-convert --checkpoint dasheng-base --output hub/dasheng-base)."
    )


@pytest.mark.parametrize("reference", ["./runs/encoder", "runs/a/encoder", "/abs/folder", "~/x", "bad name!"])
def test_a_missing_path_is_reported_as_a_missing_path(reference, empty_cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(DashengPreflightError, match="does not exist"):
        check_resources([HubResource("--model", reference)])


def test_an_unreachable_hub_is_one_request_per_run_not_retries(empty_cache, monkeypatch):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    start = time.monotonic()
    with pytest.raises(DashengPreflightError) as error:
        check_resources([HubResource("--model", "a/b"), HubResource("--dataset", "c/d", kind="dataset")])
    assert time.monotonic() - start < 10  # a refused connection, asked once: no backoff loop
    message = str(error.value)
    assert "--model 'a/b' is not in the local cache and the Hub cannot be reached" in message
    assert "--dataset 'c/d' is not in the local cache and the Hub cannot be reached" in message


def test_bf16_support_read_from_cpu_flags():
    assert cpu_has_native_bf16("flags\t: fpu sse2 avx2 avx512f avx512_bf16\n") is True
    assert cpu_has_native_bf16("flags\t: fpu sse2 avx2 fma\n") is False
    assert cpu_has_native_bf16("Features\t: fp asimd bf16\n") is True
    assert cpu_has_native_bf16("processor : 0\n") is None
    warning = warn_if_bf16_is_emulated("--bf16", "flags\t: fpu sse2 avx2\n")
    assert warning.startswith("warning: --bf16 on this CPU is emulated") and "\n" not in warning
    assert warn_if_bf16_is_emulated("--bf16", "flags\t: avx512_bf16\n") is None


def test_an_early_failure_leaves_no_new_output_folder(tmp_path):
    target = tmp_path / "out" / "run"
    with pytest.raises(KeyboardInterrupt), new_output_folder(target) as folder:
        (folder / "partial.json").write_text("{")
        raise KeyboardInterrupt
    assert not target.exists()
    with pytest.raises(ValueError), new_output_folder(target, remove_partial=False) as folder:
        (folder / "kept.json").write_text("{}")
        raise ValueError
    assert (target / "kept.json").exists()  # not removed: it holds results


def test_an_existing_output_folder_is_never_removed(tmp_path):
    (tmp_path / "old.txt").write_text("results")
    with pytest.raises(RuntimeError), new_output_folder(tmp_path):
        raise RuntimeError
    assert (tmp_path / "old.txt").read_text() == "results"


def test_an_output_folder_that_cannot_be_created_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(DashengPreflightError, match="cannot create the output folder") as error:
        with new_output_folder(tmp_path / "file" / "run"):
            pass
    assert "\n" not in str(error.value) and "pass a writable path" in str(error.value)


def test_missing_paths_alone_get_no_hub_advice(tmp_path):
    with pytest.raises(DashengPreflightError) as error:
        check_resources([HubResource("--model", str(tmp_path / "nope"))], advice="dasheng-convert ...")
    assert str(error.value) == f"--model '{tmp_path / 'nope'}' does not exist (no such file or folder)."


def test_a_repo_id_like_reference_offline_also_says_it_is_no_local_path(empty_cache):
    with pytest.raises(DashengPreflightError, match="HF_HUB_OFFLINE is set \\(no downloads\\); nor is it a local path"):
        check_resources([HubResource("--dataset", "runs/embeddings", kind="dataset")])
