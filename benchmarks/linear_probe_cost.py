"""
Cost of the whole 5-fold linear probe as a multiple of one embedding pass over the dataset.

    python benchmarks/linear_probe_cost.py [--model MODEL] [--dataset DATA] [--depth 12]

Times `embed_clips` over every clip once, then a complete cold-cache `run_protocol` (loading, embedding, five linear
heads trained with `Trainer`) and prints both and their ratio; the target is at most 1.3. By default the model is a
randomly initialised Dasheng of base width (`--depth` blocks, 12 as dasheng-base) and the data are the 1,000 FSDD
recordings of ../shared/data/fsdd arranged in the ESC-50 layout (folds by take) in a temporary folder.
"""

from __future__ import annotations

import argparse
import csv
import os
import tempfile
import time
from pathlib import Path

__all__ = ["main", "make_fsdd_esc50"]

TARGET_RATIO = 1.3
DATA_DIR = Path(os.environ.get("DASHENG_TEST_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))


def make_fsdd_esc50(root: Path) -> Path:
    """Link the FSDD recordings into an ESC-50 release layout (audio/, meta/esc50.csv) with fold = take % 5 + 1."""
    files = sorted((DATA_DIR / "fsdd").glob("*.wav"))
    if not files:
        raise FileNotFoundError(
            f"No FSDD recordings under {DATA_DIR / 'fsdd'}; pass --dataset or set DASHENG_TEST_DATA."
        )
    (root / "audio").mkdir(parents=True)
    (root / "meta").mkdir()
    with (root / "meta" / "esc50.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["filename", "fold", "target", "category", "esc10", "src_file", "take"])
        for path in files:
            digit, speaker, take = path.stem.split("_")
            (root / "audio" / path.name).symlink_to(path.resolve())
            writer.writerow([path.name, int(take) % 5 + 1, int(digit), f"digit {digit}", False, speaker, take])
    return root


def main(argv: list[str] | None = None) -> float:
    """Run the benchmark and return the ratio (whole 5-fold probe time / one embedding pass)."""
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--model", help="Hub id or folder (default: random Dasheng of base width).")
    parser.add_argument("--dataset", help="Hub id or ESC-50-layout folder (default: FSDD in that layout).")
    parser.add_argument("--depth", type=int, default=12, help="Blocks of the default random model.")
    arguments = parser.parse_args(argv)

    import torch
    import transformers
    from dasheng_hf import DashengConfig, DashengModel
    from dasheng_hf.evaluation.embeddings import embed_clips, load_encoder
    from dasheng_hf.evaluation.linear_probe import ProbeOptions, load_audio_clips, run_protocol

    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as workdir:
        work = Path(workdir)
        dataset = arguments.dataset or str(make_fsdd_esc50(work / "ESC-50-master"))
        model_name = arguments.model
        if model_name is None:
            torch.manual_seed(0)
            model_name = str(work / "model")
            DashengModel(DashengConfig(num_hidden_layers=arguments.depth)).save_pretrained(model_name)

        clips = load_audio_clips(dataset)
        model, feature_extractor = load_encoder(model_name)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        warm_up = clips.subset(range(32))
        embed_clips(model, feature_extractor, warm_up, device=device, progress=False)  # one-time start-up costs
        started = time.perf_counter()
        embed_clips(model, feature_extractor, clips, device=device, progress=False)
        embedding_seconds = time.perf_counter() - started
        del model

        started = time.perf_counter()
        options = ProbeOptions(
            model=model_name, dataset=dataset, output_dir=str(work / "run"), cache_dir=str(work / "c")
        )
        metrics = run_protocol(options)
        probe_seconds = time.perf_counter() - started

    ratio = probe_seconds / embedding_seconds
    print(f"\n{len(clips)} clips on {device}, model {arguments.model or f'random Dasheng, {arguments.depth} blocks'}")
    print(f"one embedding pass:        {embedding_seconds:8.2f} s")
    print(
        f"whole 5-fold probe:        {probe_seconds:8.2f} s (embedding {metrics['embedding_seconds']:.2f} s, "
        f"5 heads {metrics['training_seconds']:.2f} s, accuracy {metrics['accuracy_mean']:.4f})"
    )
    print(f"ratio: {ratio:.3f} (target <= {TARGET_RATIO})")
    # On a shared machine the two passes can run at different speeds; the run's own split is immune to that.
    print(f"within the run, total / its embedding: {probe_seconds / max(metrics['embedding_seconds'], 1e-9):.3f}")
    return ratio


if __name__ == "__main__":
    main()
