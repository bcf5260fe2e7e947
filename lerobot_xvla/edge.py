"""Edge inference: X-VLA's two graphs in ONNX, their int8 versions, and ONNX Runtime as the policy's backend.

The sampler (`XVLAModel.sample`) runs two graphs: the observation encoding, once per chunk, and one denoising
step, `steps` times over the cached context. `export_graphs` writes each as an ONNX file;
`quantize_graphs` adds int8 versions (ONNX Runtime's dynamic quantization of the matmuls whose weights are
constants); `OnnxRuntimeModel` is the same sampler over those files, so a directory written by
`lerobot-xvla export` loads with `XVLAPolicy.from_pretrained` (and `--policy.path` in every LeRobot command)
and gives the chunk the torch model gives for the same noise.

    pip install 'lerobot_policy_xvla[edge]'      # onnxruntime, onnx, onnxscript (the exporter)

Files of an export directory (beside config.json, the processors and the tokenizer):

    encode_observation.onnx   (input_ids [B, L] int64, image_input [B, V, 3, H, W] f32, image_mask [B, V] bool,
                               domain_id [B] int64) -> context [B, T_ctx, hidden] f32
    denoise_step.onnx         (context, domain_id, x_t [B, T, dim_action] f32, proprio [B, dim_proprio] f32,
                               t [B] f32) -> x0_hat [B, T, dim_action] f32
    *.int8.onnx               the same graphs quantized (export --int8)
    *.onnx.data               their weights (ONNX external data)
"""

from __future__ import annotations

import copy
import inspect
import itertools
import logging
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from google.protobuf.message import DecodeError
from torch import Tensor, nn

from .checkpoints import CheckpointMismatchError
from .configuration_xvla import XVLAConfig
from .modeling_xvla import XVLAModel

try:  # the `edge` extra
    import onnx
    import onnxruntime
except ModuleNotFoundError as missing:
    raise ModuleNotFoundError(
        f"X-VLA's ONNX export and runtime need {missing.name}: pip install 'lerobot_policy_xvla[edge]'", name=missing.name
    ) from missing

logger = logging.getLogger(__name__)

ENCODER = "encode_observation"
DENOISER = "denoise_step"
ENCODER_INPUTS = ("input_ids", "image_input", "image_mask", "domain_id")
DENOISER_INPUTS = ("context", "domain_id", "x_t", "proprio", "t")
OPSET = 18
# The tensor types whose values can be NaN or infinite (what torch's exporter and ONNX Runtime's quantizer write).
FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


def graph_file(name: str, quantization: str) -> str:
    """File name of graph `name` (ENCODER or DENOISER) at `quantization` ("none" or "int8")."""
    return f"{name}.onnx" if quantization == "none" else f"{name}.{quantization}.onnx"


class _EncoderGraph(nn.Module):
    """`XVLAModel.encode_observation` with the chunk length fixed, as the module torch.onnx.export traces."""

    def __init__(self, model: XVLAModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, image_input: Tensor, image_mask: Tensor, domain_id: Tensor) -> Tensor:
        return self.model.encode_observation(input_ids, image_input, image_mask, domain_id, self.model.config.chunk_size)


class _DenoiserGraph(nn.Module):
    """`XVLAModel.denoise_step`, as the module torch.onnx.export traces."""

    def __init__(self, model: XVLAModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, context: Tensor, domain_id: Tensor, x_t: Tensor, proprio: Tensor, t: Tensor) -> Tensor:
        return self.model.denoise_step(context, domain_id, x_t, proprio, t)


def example_inputs(config: XVLAConfig, batch_size: int = 2) -> dict[str, Tensor]:
    """Inputs of the network's shapes for tracing: input_ids [B, L], image_input [B, V, 3, H, W], image_mask
    [B, V], domain_id [B], proprio [B, dim_proprio]. Two samples, so the batch dimension is traced as dynamic
    (torch.export specialises a dimension of size 1)."""
    height, width = config.model_image_size
    views = config.num_image_views
    proprio = config.max_state_dim if config.use_proprio else 0
    generator = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(4, 100, (batch_size, config.tokenizer_max_length), generator=generator),
        "image_input": torch.randn(batch_size, views, 3, height, width, generator=generator),
        "image_mask": torch.ones(batch_size, views, dtype=torch.bool),
        "domain_id": torch.full((batch_size,), config.default_domain_id, dtype=torch.long),
        "proprio": torch.randn(batch_size, proprio, generator=generator) * 0.1,
    }


@torch.no_grad()
def export_graphs(model: XVLAModel, directory: Path) -> None:
    """Write the two fp32 graphs of `model` (fp32 weights, eval mode) into `directory`; the batch size and the
    number of text tokens stay dynamic."""
    inputs = example_inputs(model.config)
    batch = torch.export.Dim("batch", min=1, max=1024)
    tokens = torch.export.Dim("tokens", min=1, max=model.config.tokenizer_max_length)
    context_tokens = torch.export.Dim("context_tokens", min=1, max=model.config.max_len_seq + model.config.len_soft_prompts)
    encoder_args = tuple(inputs[name] for name in ENCODER_INPUTS)
    context = model.encode_observation(*encoder_args, model.config.chunk_size)
    x_t = torch.randn(context.shape[0], model.config.chunk_size, model.dim_action)
    denoiser_args = (context, inputs["domain_id"], x_t, inputs["proprio"], torch.full((context.shape[0],), 0.5))
    graphs = {
        ENCODER: (_EncoderGraph(model), encoder_args, ENCODER_INPUTS, "context", {"input_ids": {0: batch, 1: tokens}}),
        DENOISER: (_DenoiserGraph(model), denoiser_args, DENOISER_INPUTS, "x0_hat", {"context": {0: batch, 1: context_tokens}}),
    }
    for name, (graph, args, input_names, output_name, dims) in graphs.items():
        torch.onnx.export(
            graph.eval(),
            args,
            str(directory / graph_file(name, "none")),
            input_names=list(input_names),
            output_names=[output_name],
            dynamic_shapes={key: dims.get(key, {0: batch}) for key in input_names},
            opset_version=OPSET,
            dynamo=True,
            external_data=True,  # X-VLA-0.9B's weights exceed protobuf's 2 GB
            verbose=False,
        )


def quantize_graphs(directory: Path) -> None:
    """Write the int8 versions of the two graphs in `directory` (ONNX Runtime's dynamic quantization).

    Only MatMul nodes whose weight is a constant are quantized (int8 weights per output channel, uint8
    activations quantized per call): the linear layers of the VLM and of the transformer. The attention
    products (two activations), the per-domain action heads (weights gathered per sample), convolutions,
    embeddings, soft prompts, norms and the time embedding stay fp32.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    for name in (ENCODER, DENOISER):
        quantize_dynamic(
            directory / graph_file(name, "none"),
            directory / graph_file(name, "int8"),
            op_types_to_quantize=["MatMul"],
            per_channel=True,
            weight_type=QuantType.QInt8,
            use_external_data_format=True,
            extra_options={"MatMulConstBOnly": True},
        )


def _node_weights(nodes) -> Iterator[tuple[str, onnx.TensorProto | np.ndarray]]:
    """The constants in the attributes of `nodes` (float values, tensors, sparse tensors, and those of their
    subgraphs), each with a label for messages."""
    for node in nodes:
        for attribute in node.attribute:
            label = f"attribute {attribute.name!r} of node {node.name or node.op_type!r}"
            value = onnx.helper.get_attribute_value(attribute)
            items = value if isinstance(value, list) else [value]
            floats = [item for item in items if isinstance(item, float)]
            if floats:
                yield label, np.asarray(floats, np.float32)
            for item in items:
                if isinstance(item, onnx.SparseTensorProto):
                    item = item.values
                if isinstance(item, onnx.TensorProto):
                    yield label, item
                elif isinstance(item, onnx.GraphProto):
                    yield from _graph_weights(item)


def _graph_weights(graph: onnx.GraphProto) -> Iterator[tuple[str, onnx.TensorProto | np.ndarray]]:
    yield from ((f"initializer {tensor.name!r}", tensor) for tensor in graph.initializer)
    yield from ((f"sparse initializer {sparse.values.name!r}", sparse.values) for sparse in graph.sparse_initializer)
    yield from _node_weights(graph.node)


def _tensor_values(tensor: onnx.TensorProto, path: Path, label: str, mapped: dict[Path, np.memmap]) -> np.ndarray:
    """The values of `tensor` of the ONNX file `path`. External data must lie inside the export directory and
    within its file; each file is memory-mapped once (`mapped`)."""
    if not onnx.external_data_helper.uses_external_data(tensor):
        return onnx.numpy_helper.to_array(tensor)
    info = onnx.external_data_helper.ExternalDataInfo(tensor)
    directory = path.parent.resolve()
    data = (directory / info.location).resolve()
    if directory not in data.parents:
        raise CheckpointMismatchError(f"{path}: {label} names external data {info.location!r} outside {directory}")
    if data not in mapped and data.is_file() and data.stat().st_size:
        mapped[data] = np.memmap(data, np.uint8, "r")
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    start = info.offset or 0
    end = start + math.prod(tensor.dims) * dtype.itemsize
    size = len(mapped[data]) if data in mapped else 0
    if end > size:
        held = f"has {size} bytes" if data.is_file() else "is missing"
        raise CheckpointMismatchError(
            f"{path}: {label} is stored in bytes {start}..{end} of {info.location}, which {held}: "
            "the export is incomplete; export the checkpoint again"
        )
    return mapped[data][start:end].view(dtype) if end > start else np.empty(0, dtype)


def check_graph_weights(path: Path) -> None:
    """Refuse an ONNX file with NaN or infinite weights or constants, naming the file and the tensors, before
    ONNX Runtime loads it (as torch checkpoints are refused, `checkpoints._check_finite`): an int8 graph
    quantizes its activations around a NaN weight and gives finite, wrong actions that the action guard cannot
    tell from good ones. One sum per tensor over its memory-mapped data; `isfinite` confirms the suspects."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except DecodeError as error:
        raise CheckpointMismatchError(
            f"{path} is not a readable ONNX file ({error}); export the checkpoint again"
        ) from None
    bad, mapped = [], {}
    functions = (_node_weights(function.node) for function in model.functions)
    for label, weights in itertools.chain(_graph_weights(model.graph), *functions):
        if isinstance(weights, onnx.TensorProto):
            if weights.data_type not in FLOAT_TYPES:
                continue
            tensor, weights = weights, _tensor_values(weights, path, label, mapped)
            if onnx.external_data_helper.uses_external_data(tensor):
                label += f" (in {onnx.external_data_helper.ExternalDataInfo(tensor).location})"
        if not np.isfinite(weights.sum()) and not np.isfinite(weights).all():
            bad.append(label)
    if bad:
        shown = ", ".join(bad[:8]) + (f", ... ({len(bad) - 8} more)" if len(bad) > 8 else "")
        raise CheckpointMismatchError(
            f"{path} holds NaN or infinite values in {shown}: the export is damaged; export the checkpoint again"
        )


@torch.no_grad()
def max_action_difference(model: XVLAModel, directory: Path, quantization: str, steps: int = 10) -> float:
    """Largest |action| difference between `model` (torch) and its graphs of `quantization` in `directory`, on
    one sample of `example_inputs` with the same initial noise."""
    config = copy.deepcopy(model.config)
    config.inference_backend, config.quantization = "onnxruntime", quantization
    runtime = OnnxRuntimeModel(config)
    runtime.load_graphs(directory)
    inputs = {name: value[:1] for name, value in example_inputs(config).items()}
    noise = torch.randn(1, config.chunk_size, model.dim_action, generator=torch.Generator().manual_seed(0))
    expected = model.generate_actions(**inputs, steps=steps, noise=noise)
    return (runtime.generate_actions(**inputs, steps=steps, noise=noise) - expected).abs().max().item()


class OnnxRuntimeModel(XVLAModel):
    """`XVLAModel`'s sampler (`generate_actions`, `sample`, guidance, decoding) over the exported graphs.

    Holds no torch weights: `encode_observation` and `denoise_step` run ONNX Runtime sessions on the CPU,
    with torch's thread count, and return torch tensors on the inputs' device. The graphs are loaded by
    `load_graphs` (`XVLAPolicy.from_pretrained` of an export directory); training is refused.
    """

    def __init__(self, config: XVLAConfig) -> None:
        nn.Module.__init__(self)  # not XVLAModel.__init__: that builds the torch network
        self._set_action_space(config)
        self.uses_cuda_graphs = False
        self.directory: Path | None = None
        self.sessions: dict[str, onnxruntime.InferenceSession] = {}

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def load_graphs(self, directory: Path) -> None:
        """Open the graphs of `directory` at the config's quantization."""
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        quantization = self.config.quantization
        for name in (ENCODER, DENOISER):
            path = Path(directory) / graph_file(name, quantization)
            if not path.is_file():
                hint = " (written by `lerobot-xvla export --int8`)" if quantization == "int8" else ""
                raise FileNotFoundError(
                    f"{path} is missing: inference_backend='onnxruntime' with quantization={quantization!r} loads "
                    f"{graph_file(ENCODER, quantization)} and {graph_file(DENOISER, quantization)}{hint}"
                )
            check_graph_weights(path)
            self.sessions[name] = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.directory = Path(directory)
        logger.info("X-VLA on ONNX Runtime %s: %s graphs of %s", onnxruntime.__version__, quantization, directory)

    def generate_actions(self, *args: Any, **kwargs: Any) -> Tensor:
        """`XVLAModel.generate_actions`, refusing non-finite inputs before ONNX Runtime runs: the int8 graphs
        quantize activations around a NaN and give finite, wrong actions that the action guard cannot tell from
        good ones (torch and the fp32 graphs give NaN actions, which the guard refuses)."""
        given = inspect.signature(XVLAModel.generate_actions).bind(self, *args, **kwargs).arguments
        guidance_actions, guidance_weights = given.get("guidance") or (None, None)
        inputs = {
            "image_input": given["image_input"],
            "proprio (the state)": given["proprio"],
            "noise": given.get("noise"),
            "guidance actions": guidance_actions,
            "guidance weights": guidance_weights,
        }
        for name, value in inputs.items():
            if value is not None and not bool(torch.isfinite(value).all()):
                raise ValueError(f"{name} holds NaN or inf values; the ONNX Runtime backend refuses to act on them")
        return super().generate_actions(*args, **kwargs)

    def save_graphs(self, directory: Path) -> None:
        """Copy every graph file of the loaded export (each quantization, with its weights) into `directory`."""
        if self.directory is None:
            raise ValueError("no ONNX graphs are loaded: load the export directory with XVLAPolicy.from_pretrained")
        for path in sorted(self.directory.glob("*.onnx")) + sorted(self.directory.glob("*.onnx.data")):
            shutil.copy2(path, Path(directory) / path.name)

    def _run(self, name: str, inputs: dict[str, Tensor]) -> Tensor:
        session = self.sessions.get(name)
        if session is None:
            raise ValueError("no ONNX graphs are loaded: load the export directory with XVLAPolicy.from_pretrained")
        device = next(iter(inputs.values())).device
        feed = {key: value.detach().cpu().numpy() for key, value in inputs.items()}
        (output,) = session.run(None, feed)
        return torch.from_numpy(output).to(device)

    def encode_observation(
        self, input_ids: Tensor, image_input: Tensor, image_mask: Tensor, domain_id: Tensor, num_actions: int
    ) -> Tensor:
        if num_actions != self.config.chunk_size:
            raise ValueError(f"the exported encoder is traced for chunk_size={self.config.chunk_size}, not {num_actions}")
        return self._run(ENCODER, dict(zip(ENCODER_INPUTS, (input_ids, image_input.float(), image_mask.bool(), domain_id.long()), strict=True)))

    def denoise_step(self, context: Tensor, domain_id: Tensor, x_t: Tensor, proprio: Tensor, t: Tensor) -> Tensor:
        return self._run(DENOISER, dict(zip(DENOISER_INPUTS, (context, domain_id.long(), x_t.float(), proprio.float(), t.float()), strict=True)))

    def forward(self, *args, **kwargs):
        raise ValueError("inference_backend='onnxruntime' runs inference only; train the torch checkpoint that was exported")
