"""Edge inference (`lerobot_xvla/edge.py`): `lerobot-xvla export` writes the two graphs of the sampler in ONNX
(fp32 and int8), and a policy loaded from the export runs them on ONNX Runtime, through the same processors,
sampler, /act server and save/load as the torch policy."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import re
import shutil
import subprocess
import sys
from types import SimpleNamespace

import json_numpy
import numpy as np
import pytest
import torch

from lerobot_xvla import XVLAConfig, XVLAPolicy
from lerobot_xvla.checkpoints import CheckpointMismatchError
from lerobot_xvla.configuration_xvla import XVLAConfigError
from lerobot_xvla.modeling_xvla import load_for_inference
from lerobot_xvla.processor_xvla import make_xvla_pre_post_processors
from lerobot_xvla_cli import main as cli_main

from conftest import randomize_, tiny_config

EDGE_MODULES = ("onnxruntime", "onnx", "onnxscript")
MISSING = [name for name in EDGE_MODULES if importlib.util.find_spec(name) is None]
needs_edge = pytest.mark.skipif(
    bool(MISSING), reason=f"the `edge` extra is not installed here (no {', '.join(MISSING)}): pip install 'lerobot_policy_xvla[edge]'"
)

CAMERAS = ("observation.images.cam0", "observation.images.cam1")
BOUNDS = {"mean": torch.zeros(20), "std": torch.ones(20), "min": -torch.ones(20) * 5, "max": torch.ones(20) * 5}
STATS = {"observation.state": BOUNDS, "action": BOUNDS}
# fp32 graphs reproduce torch up to float rounding (5e-7 measured on this model).
FP32_TOLERANCE = 1e-4
# int8 graphs on the randomised tiny model: 0.015-0.07 measured over 10 observations, on chunks whose values
# reach about 0.9 (std 0.39).
INT8_TOLERANCE = 0.2
# ... and at least this far: what tells the int8 graphs from fp32 ones (5e-7) by what ran, not by a message.
INT8_LEAST_DRIFT = 1e-3


@pytest.fixture(scope="module")
def source(tmp_path_factory, tokenizer_dir):
    """A tiny two-camera checkpoint with distinct random weights and its processors, as lerobot-train writes it."""
    directory = tmp_path_factory.mktemp("edge_source")
    config = tiny_config(2, tokenizer_name=tokenizer_dir)
    randomize_(XVLAPolicy(config), seed=3).save_pretrained(directory)
    for pipeline in make_xvla_pre_post_processors(config, dataset_stats=STATS):
        pipeline.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def export(source, tmp_path_factory):
    """`lerobot-xvla export SOURCE DESTINATION --int8`, as a user runs it (in this process: one export)."""
    destination = tmp_path_factory.mktemp("edge") / "export"
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        assert cli_main(["export", str(source), str(destination), "--int8"]) == 0
    return destination, output.getvalue().splitlines()


def observation(seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    frame = {key: torch.randint(0, 256, (3, 64, 64), generator=generator, dtype=torch.uint8) for key in CAMERAS}
    return frame | {"observation.state": torch.randn(20, generator=generator), "task": "pick up the red cube"}


def chunk(checkpoint, seed: int = 0, **overrides) -> torch.Tensor:
    """The chunk [1, 30, 20] (before unnormalisation) of `observation(seed)`, same initial noise every call."""
    policy, preprocessor, _ = load_for_inference(checkpoint, **overrides)
    torch.manual_seed(0)
    return policy.predict_action_chunk(preprocessor(observation(seed)))


@needs_edge
def test_export_writes_both_graph_sets_the_config_and_the_processors(export):
    directory, lines = export
    names = {p.name for p in directory.iterdir()}
    graphs = {f"{graph}{suffix}" for graph in ("encode_observation", "denoise_step") for suffix in (".onnx", ".int8.onnx")}
    assert graphs | {f"{g}.data" for g in graphs} <= names
    assert {"config.json", "policy_preprocessor.json", "policy_postprocessor.json", "tokenizer"} <= names
    assert "model.safetensors" not in names  # the graphs carry the weights
    config = json.loads((directory / "config.json").read_text())
    assert (config["inference_backend"], config["quantization"]) == ("onnxruntime", "int8")
    fp32, int8 = (float(line.rsplit("= ", 1)[1]) for line in lines if "graphs: max" in line)
    assert fp32 < FP32_TOLERANCE and INT8_LEAST_DRIFT < int8 < INT8_TOLERANCE, lines
    assert lines[-1].startswith(f"wrote {directory} (ee6d, chunk 30") and "ONNX graphs fp32, int8" in lines[-1]


@needs_edge
@pytest.mark.parametrize("seed", [0, 1])
def test_fp32_graphs_give_the_torch_chunk(source, export, seed):
    """Same observation, same noise: the fp32 export reproduces the torch policy within 1e-4."""
    expected = chunk(source, seed)
    onnx = chunk(export[0], seed, quantization="none")
    assert onnx.shape == expected.shape == (1, 30, 20)
    assert (onnx - expected).abs().max() < FP32_TOLERANCE


@needs_edge
def test_int8_graphs_give_a_finite_chunk_within_their_tolerance(source, export):
    expected = chunk(source)
    int8 = chunk(export[0])  # the export's config loads the int8 graphs
    assert int8.shape == (1, 30, 20) and torch.isfinite(int8).all()
    drift = (int8 - expected).abs().max()
    fp32_drift = (chunk(export[0], quantization="none") - expected).abs().max()
    assert fp32_drift < FP32_TOLERANCE
    assert INT8_LEAST_DRIFT < drift < INT8_TOLERANCE and drift > 100 * fp32_drift  # quantized graphs ran, and close


@needs_edge
def test_onnx_policy_batches_and_guidance_match_torch(source, export):
    """A batch of two (the exported batch size is dynamic) and RTC guidance go through the same sampler."""
    torch_policy, preprocessor, _ = load_for_inference(source)
    onnx_policy, _, _ = load_for_inference(export[0], quantization="none")
    frames = [preprocessor(observation(seed)) for seed in (0, 1)]
    batch = {key: torch.cat([f[key] for f in frames]) if isinstance(frames[0][key], torch.Tensor) else frames[0][key] for key in frames[0]}
    guidance = (torch.zeros(2, 30, 20), torch.linspace(1, 0, 30))
    noise = torch.randn(2, 30, 20, generator=torch.Generator().manual_seed(0))
    expected = torch_policy.predict_action_chunk(batch, noise=noise, guidance=guidance, steps=4)
    actual = onnx_policy.predict_action_chunk(batch, noise=noise, guidance=guidance, steps=4)
    assert actual.shape == (2, 30, 20)
    assert (actual - expected).abs().max() < FP32_TOLERANCE


@needs_edge
def test_an_export_survives_save_and_load(export, tmp_path):
    """save_pretrained of a policy loaded from an export writes its config and every graph; it loads again
    and gives the same chunk (int8 and fp32)."""
    policy, preprocessor, postprocessor = load_for_inference(export[0])
    policy.save_pretrained(tmp_path)
    preprocessor.save_pretrained(tmp_path)
    postprocessor.save_pretrained(tmp_path)
    for quantization in ("int8", "none"):
        assert torch.equal(chunk(tmp_path, quantization=quantization), chunk(export[0], quantization=quantization))


@needs_edge
def test_select_action_and_the_act_server_run_on_the_export(source, export):
    from lerobot_xvla.http_server import XVLAService

    policy, preprocessor, postprocessor = load_for_inference(export[0])
    actions = [postprocessor(policy.select_action(preprocessor(observation()))) for _ in range(3)]
    assert all(a.shape == (1, 20) and torch.isfinite(a).all() for a in actions)

    rng = np.random.default_rng(0)
    body = json.dumps(
        {
            "image0": json_numpy.dumps(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)),
            "image1": json_numpy.dumps(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)),
            "language_instruction": "pick up the red cube",
            "proprio": json_numpy.dumps(np.zeros(20, dtype=np.float32)),
            "domain_id": 3,
        }
    ).encode()
    answers = {}
    for name, checkpoint in (("torch", source), ("onnx int8", export[0])):
        service = XVLAService(checkpoint)
        torch.manual_seed(0)  # the same initial noise (building the torch model draws from the generator)
        status, answers[name] = service.answer(body)
        assert status == 200, answers[name]
    torch_chunk, int8_chunk = (torch.tensor(answers[name]["action"]) for name in ("torch", "onnx int8"))
    assert int8_chunk.shape == torch_chunk.shape == (30, 20)
    assert (int8_chunk - torch_chunk).abs().max() < INT8_TOLERANCE


@needs_edge
def test_an_export_is_for_inference_only(export):
    policy, preprocessor, _ = load_for_inference(export[0])
    batch = preprocessor(observation()) | {"action": torch.zeros(1, 30, 20)}
    with pytest.raises(ValueError, match="inference_backend='onnxruntime' runs inference only"):
        policy.forward(batch)


@needs_edge
def test_export_refuses_a_non_empty_destination_like_convert(source, tmp_path, capsys):
    destination = tmp_path / "occupied"
    destination.mkdir()
    (destination / "notes.txt").write_text("keep me")
    assert cli_main(["export", str(source), str(destination)]) == 2
    assert capsys.readouterr().err == (
        f"lerobot-xvla export: error: the destination {destination} is not empty; pass --overwrite to replace it\n"
    )
    assert [p.name for p in destination.iterdir()] == ["notes.txt"]
    inside = source / "export"
    assert cli_main(["export", str(source), str(inside)]) == 2
    assert f"is inside the source checkpoint {source}; write the export outside it" in capsys.readouterr().err
    assert not inside.exists()


def test_missing_graphs_are_named(tmp_path, source):
    """An export without its int8 graphs (or a plain checkpoint loaded with the ONNX backend) names the files."""
    if MISSING:
        pytest.skip(f"the `edge` extra is not installed here (no {', '.join(MISSING)})")
    with pytest.raises(FileNotFoundError, match=r"encode_observation\.int8\.onnx is missing: .*lerobot-xvla export --int8"):
        load_for_inference(source, inference_backend="onnxruntime", quantization="int8")


def test_int8_needs_the_onnxruntime_backend():
    with pytest.raises(XVLAConfigError, match=r"quantization='int8' runs on ONNX Runtime: .*lerobot-xvla export"):
        tiny_config(quantization="int8")
    with pytest.raises(XVLAConfigError, match=r"quantization must be one of \['none', 'int8'\], got 'int4'"):
        tiny_config(quantization="int4", inference_backend="onnxruntime")
    with pytest.raises(XVLAConfigError, match=r"inference_backend must be one of \['torch', 'onnxruntime'\]"):
        tiny_config(inference_backend="tensorrt")
    assert isinstance(tiny_config(quantization="int8", inference_backend="onnxruntime"), XVLAConfig)


def test_the_plugin_imports_without_the_edge_extra(source):
    """Without onnxruntime, lerobot_xvla imports as before; only the ONNX backend says what is missing."""
    code = (
        "import sys\n"
        "sys.modules['onnxruntime'] = None\n"  # what an environment without the package gives
        "import lerobot_xvla\n"
        "from lerobot_xvla.modeling_xvla import load_for_inference\n"
        "try:\n"
        f"    load_for_inference({str(source)!r}, inference_backend='onnxruntime')\n"
        "except ModuleNotFoundError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "X-VLA's ONNX export and runtime need onnxruntime: pip install 'lerobot_policy_xvla[edge]'" in result.stdout


# ---------------------------------------------------------------------------------------------------------
# An export is untrusted input: NaN weights are refused at load, non-finite inputs before ONNX Runtime runs
# ---------------------------------------------------------------------------------------------------------
def float_initializer(graph, external: bool):
    """The largest float initializer of `graph` (an onnx.ModelProto) stored in external data, or inline."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    initializers = graph.graph.initializer
    floats = [t for t in initializers if t.data_type == onnx.TensorProto.FLOAT and uses_external_data(t) == external]
    return max(floats, key=lambda t: math.prod(t.dims))


def write_nan_into(path, external: bool) -> str:
    """NaN over part of a float initializer of the ONNX file `path`: in its external data file (as bytes written
    over the file), or in the graph file itself. Returns the tensor's name."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo

    graph = onnx.load(str(path), load_external_data=False)
    tensor = float_initializer(graph, external)
    count = math.prod(tensor.dims) // 4
    nan = np.full(count, np.nan, np.float32).tobytes()
    if external:
        info = ExternalDataInfo(tensor)
        with open(path.parent / info.location, "r+b") as data:
            data.seek((info.offset or 0) + 4 * count)
            data.write(nan)
    else:
        values = onnx.numpy_helper.to_array(tensor).copy().ravel()
        values[count : 2 * count] = np.nan
        tensor.CopyFrom(onnx.numpy_helper.from_array(values.reshape(tuple(tensor.dims)), tensor.name))
        onnx.save(graph, str(path))  # the graph file only: external data stays where it is
    return tensor.name


@needs_edge
@pytest.mark.parametrize(
    ("graph", "external", "quantization"),
    [
        ("encode_observation.int8.onnx", True, "int8"),
        ("denoise_step.onnx", False, "none"),
        ("encode_observation.onnx", True, "none"),
    ],
    ids=["int8_external_data", "fp32_inline", "fp32_external_data"],
)
def test_nan_weights_in_an_export_are_refused_at_load(export, tmp_path, graph, external, quantization):
    """NaN written over part of a graph's weights: loading names the file and the tensor (int8 would otherwise
    give finite, wrong actions: -1.21 .. 0.80 on this model, measured before the check existed)."""
    damaged = tmp_path / "damaged"
    shutil.copytree(export[0], damaged)
    name = write_nan_into(damaged / graph, external)
    stored = f" \\(in {re.escape(graph)}\\.data\\)" if external else ""
    expected = (
        f"{re.escape(str(damaged / graph))} holds NaN or infinite values in initializer '{re.escape(name)}'{stored}: "
        "the export is damaged"
    )
    with pytest.raises(CheckpointMismatchError, match=expected):
        load_for_inference(damaged, quantization=quantization)


@needs_edge
def test_truncated_external_data_is_refused_at_load(export, tmp_path):
    damaged = tmp_path / "truncated"
    shutil.copytree(export[0], damaged)
    data = damaged / "denoise_step.int8.onnx.data"
    data.write_bytes(data.read_bytes()[:1000])
    expected = (
        r"denoise_step\.int8\.onnx: initializer '.*' is stored in bytes \d+\.\.\d+ of denoise_step\.int8\.onnx\.data, "
        "which has 1000 bytes: the export is incomplete"
    )
    with pytest.raises(CheckpointMismatchError, match=expected):
        load_for_inference(damaged)


def non_finite(batch: dict, what: str) -> dict:
    """`batch` with NaN in one pixel of the first camera, or in one state value."""
    key = next(k for k in batch if k.startswith("observation.images")) if what == "image" else "observation.state"
    batch[key] = batch[key].clone()
    batch[key].view(-1)[0] = float("nan")
    return batch


@needs_edge
@pytest.mark.parametrize("quantization", ["int8", "none"])
def test_non_finite_inputs_are_refused_before_onnx_runtime_runs(export, quantization):
    """A NaN image, state, initial noise or guidance never reaches the graphs (int8 turned a NaN image into finite
    actions: -1.20 .. 0.76, measured before the check existed)."""
    policy, preprocessor, _ = load_for_inference(export[0], quantization=quantization)
    runs = []
    for name, session in list(policy.model.sessions.items()):  # each graph's runs recorded
        record = lambda *args, _session=session, _name=name: runs.append(_name) or _session.run(*args)
        policy.model.sessions[name] = SimpleNamespace(run=record)
    nan_chunk, inf_weights = torch.full((1, 30, 20), torch.nan), torch.full((30,), torch.inf)
    cases = {
        "image_input": (non_finite(preprocessor(observation()), "image"), {}),
        r"proprio \(the state\)": (non_finite(preprocessor(observation()), "state"), {}),
        "noise": (preprocessor(observation()), {"noise": nan_chunk}),
        "guidance actions": (preprocessor(observation()), {"guidance": (nan_chunk, torch.ones(30))}),
        "guidance weights": (preprocessor(observation()), {"guidance": (torch.zeros(1, 30, 20), inf_weights)}),
    }
    for name, (batch, extra) in cases.items():
        with pytest.raises(ValueError, match=f"^{name} holds NaN or inf values; the ONNX Runtime backend refuses to act"):
            policy.predict_action_chunk(batch, **extra)
    assert runs == []
    assert torch.isfinite(policy.predict_action_chunk(preprocessor(observation()))).all()
    assert runs == ["encode_observation"] + ["denoise_step"] * policy.config.num_denoising_steps


@needs_edge
def test_a_full_disk_during_the_int8_quantization_is_one_line(source, tmp_path, capsys, monkeypatch):
    """On a full disk ONNX's shape inference (which the quantizer runs) writes a truncated file without an error,
    and reading it back raises protobuf's DecodeError: reported as a write failure, nothing left behind."""
    import onnx.shape_inference

    infer_shapes_path = onnx.shape_inference.infer_shapes_path

    def full_disk(model_path, output_path, *args, **kwargs):
        infer_shapes_path(model_path, output_path, *args, **kwargs)
        with open(output_path, "r+b") as written:
            written.truncate(written.seek(0, 2) // 3)

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes_path", full_disk)
    destination = tmp_path / "export"
    assert cli_main(["export", str(source), str(destination), "--int8"]) == 2
    captured = capsys.readouterr()
    assert re.fullmatch(
        f"lerobot-xvla export: error: cannot write the export to {re.escape(str(destination))}: an ONNX file written "
        r"there could not be read back \(Error parsing message.*\), as on a full disk \(free without this run's "
        r"files: .*\); the destination is as it was\n",
        captured.err,
    )
    assert list(tmp_path.iterdir()) == []
