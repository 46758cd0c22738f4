"""
Property-based tests of DashengFeatureExtractor (hypothesis): any audio (dtype, container, shape, length, values from
silence to 3e38, NaN, inf, integers) in any batch with any padding options either raises a ValueError that names the
problem, predicted here from the input, or gives finite features of the documented shape in which every clip equals
the clip alone, which in turn equals the original front end (float64 for loud clips).

`pytest --hypothesis-profile=deep --hypothesis-show-statistics` runs many more inputs and prints the outcome classes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dasheng_hf import DashengFeatureExtractor
from helpers import make_reference_encoder
from hypothesis import event, given
from hypothesis import strategies as st

EXTRACTOR = DashengFeatureExtractor()
FLOAT32_MAX = float(np.finfo(np.float32).max)
SPECIAL_VALUES = [np.nan, np.inf, -np.inf, 0.0, FLOAT32_MAX, -FLOAT32_MAX, 1e-45, 1e39, -1e300]
AMPLITUDES = [0.0, 1e-30, 1e-6, 1.0, 32768.0, 1e12, 1e13, 1e20, 1e30, 1e37]


@pytest.fixture(scope="module")
def reference_front_end():
    """The original's torchaudio front end, also in float64 (for clips whose float32 power would overflow)."""
    front_end = make_reference_encoder().front_end
    return front_end, make_reference_encoder().front_end.double()


@st.composite
def clips(draw, valid: bool = False):
    """One clip as a numpy array: clean float audio of any level (`valid`), or else sometimes too short, with
    NaN/inf/huge samples, or of a dtype that is not float (the container is chosen separately)."""
    kind = "clean" if valid else draw(st.sampled_from(["clean"] * 3 + ["short", "special", "dtype"]))
    if kind == "short":
        length = draw(st.one_of(st.integers(0, 479), st.sampled_from([0, 1, 479])))
    else:
        length = draw(st.one_of(st.integers(480, 6000), st.sampled_from([480, 481, 639, 640])))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    amplitude = draw(st.one_of(st.sampled_from(AMPLITUDES), st.floats(-38, 38).map(lambda e: 10.0**e)))
    shape = draw(st.sampled_from(["noise", "constant", "sine", "impulse"]))
    if shape == "noise":
        noise = rng.standard_normal(length)
        values = noise / max(1.0, float(np.abs(noise).max(initial=0.0))) * amplitude
    elif shape == "constant":
        values = np.full(length, amplitude)
    elif shape == "sine":
        values = amplitude * np.sin(2 * np.pi * rng.uniform(20, 7900) * np.arange(length) / 16000)
    else:
        values = np.zeros(length)
        if length:
            values[rng.integers(length)] = amplitude
    if kind == "special" and length:
        for _ in range(draw(st.integers(1, 3))):
            values[rng.integers(length)] = draw(st.sampled_from(SPECIAL_VALUES))
    dtypes = ["int16", "bool", "complex64"] if kind == "dtype" else ["float32", "float32", "float64"]
    if kind != "clean" or amplitude < 6e4:
        dtypes.append("float16")
    dtype = draw(st.sampled_from(dtypes))
    with np.errstate(all="ignore"):
        if dtype == "int16":
            return rng.integers(-32768, 32767, length).astype(np.int16)
        if dtype == "bool":
            return values > 0
        return values.astype(dtype)


def as_container(array: np.ndarray, container: str):
    if container == "torch":
        return torch.from_numpy(array.copy())
    if container == "list":
        return array.tolist()
    return array


@st.composite
def padding_options(draw):
    """Keyword arguments of `__call__`, each given or left out; mostly valid, sometimes contradictory."""
    options = {}
    if draw(st.booleans()):
        options["padding"] = draw(st.sampled_from([True, False, "longest", "max_length", "do_not_pad", "max"]))
    if draw(st.integers(0, 2)):
        options["max_length"] = draw(st.one_of(st.integers(480, 8000), st.none(), st.integers(0, 479)))
    if draw(st.booleans()):
        options["truncation"] = draw(st.booleans())
    if draw(st.booleans()):
        options["pad_to_multiple_of"] = draw(st.one_of(st.none(), st.integers(1, 5000)))
    if draw(st.booleans()):
        options["return_tensors"] = draw(st.sampled_from(["pt", "np", None]))
    if draw(st.booleans()):
        options["return_attention_mask"] = draw(st.sampled_from([None, True, False]))
    return options


def expected_problem(batch: list[np.ndarray], options: dict) -> str | None:
    """The first problem the extractor checks for, in its order, as a fragment of the message (None: valid)."""
    padding = {True: "longest", False: "do_not_pad"}.get(options.get("padding", True), options.get("padding", True))
    max_length, truncation = options.get("max_length"), options.get("truncation", False)
    multiple = options.get("pad_to_multiple_of")
    if padding not in ("longest", "max_length", "do_not_pad"):
        return "padding must be True, False or one of"
    if max_length is not None and max_length < 1:
        return "max_length must be a positive integer"
    if padding == "max_length" and max_length is None:
        return "padding='max_length' needs max_length"
    if truncation and max_length is None:
        return "truncation=True needs max_length"
    if max_length is not None and multiple is not None and max_length % multiple:
        max_length = (max_length // multiple + 1) * multiple
    if max_length is not None and max_length < 480 and (truncation or padding == "max_length"):
        return "is shorter than the shortest clip"
    for index, clip in enumerate(batch):
        if clip.dtype.kind not in "f":
            return f"Clip {index} has dtype"
        if clip.size < 480:
            return f"Clip {index} is " + ("empty" if clip.size == 0 else f"{clip.size} samples long")
        if not np.isfinite(clip).all():
            return f"Clip {index} contains NaN or infinite samples"
        if float(np.abs(clip.astype(np.float64)).max()) > FLOAT32_MAX:
            return f"Clip {index} has samples beyond the float32 range"
    lengths = [min(clip.size, max_length) if truncation else clip.size for clip in batch]
    if padding == "max_length" and max(lengths) > max_length:
        return f"Clip {int(np.argmax(np.array(lengths) > max_length))} has"
    frames = {length // 160 + 1 for length in lengths}
    if padding == "do_not_pad" and len(frames) > 1 and options.get("return_tensors", "pt") is not None:
        return "With padding=False the clips keep their own lengths"
    return None


def expected_frames(lengths: list[int], options: dict) -> int | None:
    padding = {True: "longest", False: "do_not_pad"}.get(options.get("padding", True), options.get("padding", True))
    max_length, multiple = options.get("max_length"), options.get("pad_to_multiple_of")
    if padding == "do_not_pad":
        return None
    target = max(lengths) if padding == "longest" else max_length
    if multiple is not None:
        target = -(-target // multiple) * multiple
    return target // 160 + 1


@st.composite
def valid_options(draw, lengths: list[int]):
    """Options that are valid for clips of `lengths` samples."""
    options = draw(padding_options())
    padding = options.get("padding", True)
    if padding not in (True, False, "longest", "max_length", "do_not_pad"):
        options["padding"] = padding = "longest"
    too_short = options.get("max_length") is not None and options["max_length"] < 480
    if options.get("truncation") or padding == "max_length" or too_short:
        longest = max(lengths) if not options.get("truncation") else 480
        options["max_length"] = draw(st.integers(max(480, longest), max(480, longest) + 4000))
    if padding in (False, "do_not_pad") and len(lengths) > 1:
        options["return_tensors"] = None
    return options


@given(data=st.data(), container=st.sampled_from(["numpy", "torch", "list"]), stacked=st.booleans())
def test_valid_audio_and_options_give_finite_clip_by_clip_features(reference_front_end, data, container, stacked):
    batch = data.draw(st.lists(clips(valid=True), min_size=1, max_size=4), label="batch")
    options = data.draw(valid_options([clip.size for clip in batch]), label="options")
    check(reference_front_end, batch, container, stacked, options, must_be_valid=True)


@given(
    batch=st.lists(clips(), min_size=1, max_size=4),
    container=st.sampled_from(["numpy", "torch", "list"]),
    stacked=st.booleans(),
    options=padding_options(),
)
def test_any_audio_and_options_give_the_predicted_error_or_features(
    reference_front_end, batch, container, stacked, options
):
    check(reference_front_end, batch, container, stacked, options, must_be_valid=False)


def check(
    reference_front_end, batch: list[np.ndarray], container: str, stacked: bool, options: dict, must_be_valid: bool
):
    """Call the extractor; compare the error with `expected_problem`, or the features with each clip alone."""
    one = len(batch) == 1 and not stacked
    same_length = len({clip.size for clip in batch}) == 1 and len({clip.dtype for clip in batch}) == 1
    if stacked and same_length and container != "list":
        raw = as_container(np.stack(batch), container)  # (batch, samples)
    elif one:
        raw = as_container(batch[0], container)
    else:
        raw = [as_container(clip, container) for clip in batch]
    problem = expected_problem(batch, options)
    if one and container == "list" and batch[0].size == 0 and (problem or "Clip").startswith("Clip"):
        problem = "Got an empty list"
    assert not must_be_valid or problem is None, problem
    try:
        output = EXTRACTOR(raw, sampling_rate=16000, **options)
    except ValueError as error:
        event(f"ValueError: {problem.split(' (')[0] if problem else 'unexpected'}")
        assert problem is not None and problem in str(error), (problem, str(error))
        return
    assert problem is None, f"expected an error about {problem!r}"

    truncation, max_length = options.get("truncation", False), options.get("max_length")
    multiple = options.get("pad_to_multiple_of")
    if truncation and multiple is not None and max_length % multiple:
        max_length = (max_length // multiple + 1) * multiple
    clips_used = [clip[:max_length] if truncation else clip for clip in batch]
    lengths = [clip.size for clip in clips_used]
    frames = [length // 160 + 1 for length in lengths]
    width = expected_frames(lengths, options)
    return_tensors = options.get("return_tensors", "pt")
    values = output["input_values"]
    if width is None and len(set(frames)) > 1:
        event("ok: unpadded lists")
        assert isinstance(values, list) and [v.shape for v in values] == [(64, f) for f in frames]
        rows = [torch.from_numpy(v) for v in values]
    else:
        width = frames[0] if width is None else width
        event(f"ok: {'padded' if min(frames) < width else 'unpadded'} {return_tensors}")
        as_tensor = torch.as_tensor(np.stack(values)) if isinstance(values, list) else torch.as_tensor(values)
        assert as_tensor.shape == (len(batch), 64, width) and as_tensor.dtype == torch.float32
        assert isinstance(values, {"pt": torch.Tensor, "np": np.ndarray, None: list}[return_tensors])
        rows = list(as_tensor)
        mask = output.get("attention_mask")
        asked = options.get("return_attention_mask")
        assert (mask is not None) == (min(frames) < width or asked is not False)
        if mask is not None:
            mask = torch.as_tensor(np.stack(mask)) if isinstance(mask, list) else torch.as_tensor(mask)
            assert mask.sum(-1).tolist() == frames and mask.dtype == torch.int32
    for row, clip, count in zip(rows, clips_used, frames):
        assert bool(torch.isfinite(row).all())
        alone = EXTRACTOR(clip, sampling_rate=16000).input_values[0]
        assert bool((row[:, count:] == (alone.max() - 120).clamp(min=-100)).all())  # the clip's silence level
        assert torch.equal(row[:, :count], alone)
        check_against_reference(reference_front_end, clip, alone)


def check_against_reference(reference_front_end, clip: np.ndarray, features: torch.Tensor) -> None:
    """Features of one clip against the original front end: float32 below 1e12, float64 above."""
    samples = torch.from_numpy(clip.astype(np.float32))
    peak = float(samples.abs().max())
    event("clip: loud, float64" if peak > 1e12 else "clip: float32")
    if peak <= 1e12:
        expected = reference_front_end[0](samples[None])[0]
        assert float((features - expected).abs().max()) <= 1e-4
    else:
        expected = reference_front_end[1](samples[None].double())[0].float()
        assert float((features - expected).abs().max()) <= 1e-3


@given(
    lengths=st.lists(st.integers(480, 8000), min_size=1, max_size=5),
    split=st.integers(0, 5),
    form=st.sampled_from(["tensor", "numpy", "lists", "batched rows"]),
    options=st.fixed_dictionaries(
        {},
        optional={
            "padding": st.sampled_from([True, "longest", "max_length"]),
            "max_length": st.integers(30, 40),
            "pad_to_multiple_of": st.one_of(st.none(), st.integers(1, 16)),
        },
    ),
    seed=st.integers(0, 2**16),
)
def test_pad_of_clips_extracted_apart_equals_one_call(lengths, split, form, options, seed):
    """DataCollatorWithPadding's path: pad() of examples, however formed, equals one batched call padded alike."""
    if options.get("padding") == "max_length":
        options.setdefault("max_length", 40)
    generator = torch.Generator().manual_seed(seed)
    audio = [0.1 * torch.randn(length, generator=generator) for length in lengths]
    if form == "batched rows":  # rows of two padded sub-batches, each row with its own mask
        parts = [EXTRACTOR(audio[:split], sampling_rate=16000)] if split else []
        parts += [EXTRACTOR(audio[split:], sampling_rate=16000)] if split < len(audio) else []
        examples = [
            {"input_values": part.input_values[row], "attention_mask": part.attention_mask[row], "label": row}
            for part in parts
            for row in range(part.input_values.shape[0])
        ]
    else:
        alone = [EXTRACTOR(clip, sampling_rate=16000) for clip in audio]
        convert = {"tensor": lambda x: x, "numpy": lambda x: x[0].numpy(), "lists": lambda x: x[0].tolist()}[form]
        examples = [{"input_values": convert(one.input_values), "label": i} for i, one in enumerate(alone)]
    frames = [length // 160 + 1 for length in lengths]
    target = max(frames) if options.get("padding", True) in (True, "longest") else options["max_length"]
    if options.get("pad_to_multiple_of"):
        target = -(-target // options["pad_to_multiple_of"]) * options["pad_to_multiple_of"]
    try:
        padded = EXTRACTOR.pad(examples, return_tensors="pt", **options)
    except ValueError as error:
        event("ValueError: longer than max_length")
        assert max(frames) > target and "more than max_length" in str(error)
        return
    event(f"ok: {form}")
    direct = EXTRACTOR(audio, sampling_rate=16000)
    assert padded.input_values.shape == (len(audio), 64, target)
    assert torch.equal(padded.input_values[..., : max(frames)], direct.input_values)
    silence = torch.stack(
        [(row[:, :count].max() - 120).clamp(min=-100) for row, count in zip(direct.input_values, frames)]
    )
    assert bool((padded.input_values[..., max(frames) :] == silence[:, None, None]).all())
    assert padded.attention_mask.sum(-1).tolist() == frames
    assert padded["label"].tolist() == [example["label"] for example in examples]
