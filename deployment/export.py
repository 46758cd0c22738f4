"""
`dasheng-export MODEL --output-dir DIR [--quantize int8]`: a saved or Hub Dasheng model to a deployable folder.

The folder holds `model.onnx` (+ `model.onnx.data` for models over 2 GB), `model_quantized.onnx` with
`--quantize int8`, `model.pt2` (the `torch.export` program), the numpy front end (`front_end.npz`, `front_end.json`),
`dasheng_onnx.py` (the runtime: `DashengOnnxEncoder`, numpy and onnxruntime only),
`dasheng_export.json` (model id, rates, outputs, label names) and the model's `config.json` and
`preprocessor_config.json`. It is written to a temporary folder beside DIR and renamed at the end, so a failed or
interrupted export leaves DIR as it was. Arguments are parsed before torch is imported: `--help` is fast.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "export_folder", "main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, argparse's exit status
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dasheng-export",
        description="Export a Dasheng model (encoder or classifier) to ONNX (+ int8) and a torch.export program.",
    )
    parser.add_argument("model", metavar="MODEL", help="a saved model folder or a Hub id (e.g. mispeech/dasheng-base)")
    parser.add_argument("--output-dir", required=True, help="folder to write (replaced whole at the end)")
    parser.add_argument("--quantize", choices=["int8"], help="also write model_quantized.onnx (dynamic int8)")
    parser.add_argument("--no-pt2", action="store_true", help="skip the torch.export program (model.pt2)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    return parser


def _check_arguments(args: argparse.Namespace) -> None:
    """Fail before any heavy work: an output folder in the way, a missing model folder or uncached Hub id offline."""
    from ..cli.preflight import HubResource, check_resources

    output = Path(args.output_dir)
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output-dir {output} exists and is not a folder.")
    if output.is_dir() and any(output.iterdir()) and not args.overwrite:
        raise ValueError(f"--output-dir {output} is not empty: pass --overwrite to replace it.")
    check_resources([HubResource("MODEL", args.model)])
    model = Path(args.model).expanduser()
    if model.exists() and not (model / "config.json").is_file():
        raise ValueError(f"MODEL folder {model} has no config.json: pass a folder saved with save_pretrained.")


def _load_model(source: str) -> Any:
    from ..configuration_dasheng import DashengConfig
    from ..modeling_dasheng import DashengForAudioClassification, DashengModel

    try:
        config = DashengConfig.from_pretrained(source)
    except OSError as error:
        message = f"MODEL {source} is not a local folder and could not be loaded from the Hub ({error})"
        raise ValueError(message) from error
    classifier = "DashengForAudioClassification" in (config.architectures or [])
    model_class = DashengForAudioClassification if classifier else DashengModel
    return model_class.from_pretrained(source, attn_implementation="sdpa").eval()


def _write_front_end(model: Any, folder: Path) -> None:
    import numpy as np
    import torch

    from ..feature_extraction_dasheng import DashengFeatureExtractor

    extractor = DashengFeatureExtractor.from_dasheng_config(model.config)
    extractor.to_json_file(folder / "preprocessor_config.json")  # no code files: the folder needs no torch
    window = torch.hann_window(extractor.win_size, periodic=True).numpy()
    np.savez(folder / "front_end.npz", window=window, mel_filters=extractor.mel_filters)
    settings = {
        "n_fft": extractor.n_fft,
        "hop_size": extractor.hop_size,
        "sampling_rate": extractor.sampling_rate,
        "top_db": extractor.top_db,
        "center": extractor.center,
    }
    (folder / "front_end.json").write_text(json.dumps(settings, indent=2) + "\n")


def export_folder(model: Any, folder: Path, model_id: str, quantize: str | None = None, pt2: bool = True) -> None:
    """Write every file of an export folder for `model` (a loaded Dasheng model) into the existing `folder`."""
    import torch

    from .exporters import MIN_FRAMES, export_onnx, export_program, quantize_int8

    config = model.config
    has_head = getattr(model, "outputlayer", None) is not None
    labels = {str(k): v for k, v in config.id2label.items()} if has_head else {}
    info = {
        "model_id": model_id,
        "sampling_rate": 16000,
        "hop_size": 160,
        "num_mel_bins": config.num_mel_bins,
        "token_rate_hz": 25,
        "chunk_seconds": config.chunk_num_tokens * 0.04,
        "min_frames": MIN_FRAMES,
        "inputs": {"input_values": ["batch", config.num_mel_bins, "frames"], "attention_mask": ["batch", "frames"]},
        "outputs": ["last_hidden_state", "pooler_output"] + (["logits"] if has_head else []),
        "id2label": labels,
        "torch_version": torch.__version__,
    }
    _write_front_end(model, folder)
    shutil.copyfile(Path(__file__).with_name("runtime.py"), folder / "dasheng_onnx.py")
    config.to_json_file(folder / "config.json")
    _step("model.onnx", lambda: export_onnx(model, folder / "model.onnx", {k: info[k] for k in _ONNX_METADATA}))
    if quantize == "int8":
        _step("model_quantized.onnx", lambda: quantize_int8(folder / "model.onnx", folder / "model_quantized.onnx"))
    if pt2:
        _step("model.pt2", lambda: torch.export.save(export_program(model), str(folder / "model.pt2")))
    (folder / "dasheng_export.json").write_text(json.dumps(info, indent=2) + "\n")


_ONNX_METADATA = ("model_id", "sampling_rate", "hop_size", "num_mel_bins", "min_frames", "id2label")


def _step(name: str, work: Any) -> None:
    start = time.perf_counter()
    print(f"writing {name} ...", end=" ", flush=True)
    work()
    print(f"{time.perf_counter() - start:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    output = Path(args.output_dir)
    staging = None
    try:
        _check_arguments(args)
        import logging
        import warnings

        warnings.filterwarnings("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        model = _load_model(args.model)
        output.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # mkdtemp's folder is private; the export is an ordinary folder
        export_folder(model, staging, args.model, args.quantize, pt2=not args.no_pt2)
        old = output.with_name(f".{output.name}.old") if output.exists() else None
        if old is not None:  # the old folder stays whole until the new one is in place
            shutil.rmtree(old, ignore_errors=True)
            output.rename(old)
        staging.rename(output)
        staging = None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except KeyboardInterrupt:
        print("dasheng-export: interrupted; the output folder is unchanged.", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - one line for the user, whatever failed
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"dasheng-export: error: {message}", file=sys.stderr)
        return 1
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    sizes = ", ".join(f"{p.name} {p.stat().st_size / 1e6:.1f} MB" for p in sorted(output.glob("model*")))
    print(f"Exported {args.model} to {output}: {sizes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
