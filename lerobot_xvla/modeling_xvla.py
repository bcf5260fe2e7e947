"""X-VLA: `XVLAModel`, the network, and `XVLAPolicy`, its LeRobot adapter.

XVLAModel keeps the original code's two entry points so its outputs compare directly with the reference:

    forward(input_ids, image_input, image_mask, domain_id, proprio, action) -> dict of weighted losses
    generate_actions(input_ids, image_input, image_mask, domain_id, proprio, steps, noise=None) -> [B, T, D]

Flow matching follows the released code (not the paper's notation): t = 1 is pure noise,
x_t = t * noise + (1 - t) * action, the network predicts the clean action chunk (x0-prediction), t is drawn
stratified over the batch, and sampling re-noises the same initial noise towards each new estimate.

XVLAPolicy turns LeRobot batches into those tensors, queues actions for `select_action`, and reads and
writes every checkpoint layout (`lerobot_xvla.checkpoints`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Collection
from functools import partial
from pathlib import Path
from typing import Any

import torch
from lerobot.configs.default import PeftConfig
from lerobot.configs.policies import PreTrainedConfig
from lerobot.policies.pretrained import PreTrainedPolicy
from lerobot.utils.constants import (
    ACTION,
    OBS_LANGUAGE_TOKENS,
    OBS_STATE,
    POLICY_POSTPROCESSOR_DEFAULT_NAME,
    POLICY_PREPROCESSOR_DEFAULT_NAME,
)
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from . import __version__
from .action_modes import build_action_mode
from .checkpoints import checkpoint_florence_config, is_original_config, load_state_dict_strict, original_config_to_lerobot, to_saved_layout
from .configuration_xvla import XVLAConfig, XVLAConfigError
from .execution import ChunkExecutor, check_rtc_leftover, lerobot_rtc_guidance
from .florence import build_florence_encoder, encode_views, projection_dim
from .mixture.dataset import MixtureMetadata
from .mixture.sources import MIXTURE_DOMAIN_KEY
from .processor_files import refuse_outside
from .processor_xvla import TOKENIZER_DIR, normalized_pixel_range, resolve_tokenizer_name, whole_domain_ids
from .soft_transformer import SoftPromptedTransformer
from .training import parameter_groups, resample_anchors

logger = logging.getLogger(__name__)

DOMAIN_ID = "domain_id"
# Prefix of the per-domain loss sums a mixture's forward pass reports beside the loss terms (logged, not summed).
DOMAIN_LOSS = "domain_loss/"
ACTION_IS_PAD = "action_is_pad"
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")
# Layers whose weights weights_dtype="bfloat16" stores in bf16; norms and positional tables stay fp32.
BF16_WEIGHT_LAYERS = (nn.Linear, nn.Conv2d, nn.Embedding)
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that capture CUDA graphs on a GPU
LORA_RANK = 8  # peft_train.py: LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
LEROBOT_DEFAULT_PEFT_RANK = PeftConfig.r  # what lerobot-train passes when --peft.r is not given


def recompute_in_backward(module: nn.Module) -> None:
    """Gradient checkpointing of one layer: keep only its inputs in training and recompute it in the
    backward pass. Replaces the instance's forward, so parameter names (and checkpoints) are unchanged."""
    forward = module.forward

    def checkpointed(*args, **kwargs):
        if module.training and torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    module.forward = checkpointed


class XVLAModel(nn.Module):
    """Florence-2 encoder + soft-prompted transformer + action mode."""

    def __init__(self, config: XVLAConfig) -> None:
        super().__init__()
        self._set_action_space(config)
        self.vlm = build_florence_encoder(config.florence_config)
        self.transformer = SoftPromptedTransformer(
            hidden_size=config.hidden_size,
            multi_modal_input_size=projection_dim(self.vlm),
            depth=config.depth,
            num_heads=config.num_heads,
            mlp_ratio=config.mlp_ratio,
            num_domains=config.num_domains,
            dim_action=self.dim_action,
            dim_proprio=self.dim_proprio,
            dim_time=config.dim_time,
            len_soft_prompts=config.len_soft_prompts,
            max_len_seq=config.max_len_seq,
            use_hetero_proj=config.use_hetero_proj,
        )
        if config.gradient_checkpointing:
            vision_blocks = [block for stage in self.vlm.vision_tower.blocks for block in stage]
            for layer in [*self.transformer.blocks, *self.vlm.language_model.encoder.layers, *vision_blocks]:
                recompute_in_backward(layer)
        self._freeze()
        if config.compile_model:
            # Two graphs, the observation encoding and one denoising step, instead of one graph unrolled over
            # every step: the same kernels (and CUDA graphs) at a fraction of the compile time.
            compile_graph = partial(torch.compile, mode=config.compile_mode, dynamic=False, fullgraph=True)
            self.encode_observation = compile_graph(self.encode_observation)
            self.transformer.denoise = compile_graph(self.transformer.denoise)
        self.uses_cuda_graphs = config.compile_model and config.compile_mode in CUDA_GRAPH_MODES

    def _set_action_space(self, config: XVLAConfig) -> None:
        """What the sampler reads of the config, whatever runs the network (torch here, ONNX Runtime in edge.py)."""
        self.config = config
        self.action_mode = build_action_mode(config.action_mode_of_domain, config.action_dim, config.max_action_dim)
        self.dim_action = self.action_mode.dim_action
        # A mixture in training: each domain's mode on its own width, so padded channels carry no loss.
        self.domain_modes = {}
        if config.mixture and config.domain_id is None:
            widths = {d: s.action_dim for d, s in config.mixture_domains.items()}
            if None in widths.values():
                raise ValueError("the mixture's sources have no action widths yet: lerobot-train fills them from the datasets")
            self.domain_modes = {
                d: build_action_mode(s.action_mode or config.action_mode, s.action_dim, config.max_action_dim)
                for d, s in config.mixture_domains.items()
            }
            if {m.dim_action for m in self.domain_modes.values()} != {self.dim_action}:
                raise ValueError(f"the mixture's action modes denoise vectors of different widths than {self.dim_action}")
        self.dim_proprio = config.max_state_dim if config.use_proprio else 0

    def _freeze(self) -> None:
        frozen: list[nn.Module | nn.Parameter] = []
        if self.config.freeze_vision_encoder:
            frozen.append(self.vlm.vision_tower)
        if self.config.freeze_language_encoder:
            frozen.append(self.vlm.language_model)
        if not self.config.train_policy_transformer:
            frozen += [m for name, m in self.transformer.named_children() if name != "soft_prompt_hub"]
            frozen.append(self.transformer.pos_emb)
        if not self.config.train_soft_prompts and self.config.len_soft_prompts > 0:
            frozen.append(self.transformer.soft_prompt_hub)
        for part in frozen:
            for param in part.parameters() if isinstance(part, nn.Module) else [part]:
                param.requires_grad_(False)

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.pos_emb.dtype

    def forward_vlm(self, input_ids: Tensor, image_input: Tensor, image_mask: Tensor) -> dict[str, Tensor]:
        """Encode the text and the views.

        input_ids [B, L]; image_input [B, V, 3, H, W] (ImageNet-normalised); image_mask [B, V] (False = absent).
        Returns vlm_features [B, T_img + L, D] (primary view and text through the BART encoder) and
        aux_visual_inputs [B, (V - 1) * T_img, D] (the other views, projected image tokens only; absent
        views are zero tokens, as in the original).
        """
        batch, views = image_input.shape[:2]
        # Every slot is encoded and absent ones are zeroed afterwards: static shapes, no host sync.
        tokens = encode_views(self.vlm, image_input.flatten(0, 1)).unflatten(0, (batch, views))
        tokens = tokens * image_mask.to(tokens.dtype)[:, :, None, None]
        text = self.vlm.get_input_embeddings()(input_ids)
        encoder = self.vlm.language_model.encoder
        vlm_features = encoder(inputs_embeds=torch.cat([tokens[:, 0], text], dim=1)).last_hidden_state
        return {"vlm_features": vlm_features, "aux_visual_inputs": tokens[:, 1:].flatten(1, 2)}

    def forward(
        self,
        input_ids: Tensor,
        image_input: Tensor,
        image_mask: Tensor,
        domain_id: Tensor,
        proprio: Tensor,
        action: Tensor,
        action_valid: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Training losses for target chunks action [B, T, dim_action]; action_valid [B, T] masks padded steps."""
        dtype = self.dtype
        image_input, proprio, action = image_input.to(dtype), proprio.to(dtype), action.to(dtype)
        encoded = self.forward_vlm(input_ids, image_input, image_mask)
        batch = action.shape[0]
        # One uniform draw, stratified over the batch, kept below 1 (the original's convention).
        t = (torch.rand(1, device=action.device, dtype=dtype) + torch.arange(batch, device=action.device, dtype=dtype) / batch) % (1 - 1e-5)
        noise = torch.randn_like(action)
        x_t = noise * t[:, None, None] + action * (1 - t)[:, None, None]
        pred = self.transformer(
            domain_id=self._network_domain(domain_id),
            action_with_noise=self._mask_inputs(x_t, domain_id),
            proprio=self._mask_inputs(proprio, domain_id),
            t=t,
            **encoded,
        )
        if not self.domain_modes:
            return self.action_mode.loss(pred, action, action_valid)
        return self._mixture_losses(pred, action, action_valid, domain_id)

    def _network_domain(self, domain_id: Tensor) -> Tensor:
        """The domain whose soft prompts and heads a sample uses: its own, or domain 0 for every sample with
        `domain_blind` (the ablation that keeps everything else per domain)."""
        return torch.zeros_like(domain_id) if self.config.domain_blind else domain_id

    def _mask_inputs(self, x: Tensor, domain_id: Tensor) -> Tensor:
        """The action mode's input masking; in a mixture, each sample's domain's."""
        if not self.domain_modes:
            return self.action_mode.mask_inputs(x)
        masked = x
        for domain, mode in self.domain_modes.items():
            chosen = (domain_id == domain).reshape(-1, *([1] * (x.ndim - 1)))
            masked = torch.where(chosen, mode.mask_inputs(x), masked)
        return masked

    def _mixture_losses(self, pred: Tensor, action: Tensor, valid: Tensor | None, domain_id: Tensor) -> dict[str, Tensor]:
        """Each domain's loss on its samples, weighted by their share of the batch (a per-sample mean over the batch),
        plus each domain's summed loss under DOMAIN_LOSS (detached, for the logs)."""
        terms: dict[str, Tensor] = {}
        batch = pred.shape[0]
        for domain, mode in self.domain_modes.items():
            rows = (domain_id == domain).nonzero().flatten()
            if rows.numel() == 0:
                continue
            own = mode.loss(pred[rows], action[rows], None if valid is None else valid[rows])
            for name, value in own.items():
                terms[name] = terms.get(name, 0) + value * (rows.numel() / batch)
            terms[f"{DOMAIN_LOSS}{domain}"] = torch.stack(list(own.values())).sum().detach()
        return terms

    @torch.no_grad()
    def generate_actions(
        self,
        input_ids: Tensor,
        image_input: Tensor,
        image_mask: Tensor,
        domain_id: Tensor,
        proprio: Tensor,
        steps: int,
        noise: Tensor | None = None,
        guidance: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """Sample an action chunk [B, chunk_size, action_dim] in dataset units with `steps` denoising steps.

        noise [B, chunk_size, dim_action] is the initial x_1 (drawn from N(0, I) when None). guidance
        (actions [B, chunk_size, action_dim], weights [chunk_size]) pulls every clean-chunk estimate towards
        known actions (see `execution.py`); channels trained as logits are left free.
        """
        dtype = self.dtype
        batch, horizon = input_ids.shape[0], self.config.chunk_size
        if noise is None:
            noise = torch.randn(batch, horizon, self.dim_action, device=proprio.device, dtype=dtype)
        target = weight = None
        if guidance is not None:
            actions, time_weights = guidance
            target = nn.functional.pad(actions.to(dtype), (0, self.dim_action - actions.shape[-1]))
            channels = torch.zeros(self.dim_action, dtype=dtype, device=target.device)
            channels[: actions.shape[-1]] = 1
            channels[list(self.action_mode.logit_channels)] = 0
            weight = time_weights.to(target)[None, :, None] * channels
        domain_id = self._network_domain(domain_id)
        actions = self.sample(input_ids, image_input.to(dtype), image_mask, domain_id, proprio.to(dtype), noise.to(dtype), steps, target, weight)
        return self.action_mode.decode(actions)

    def encode_observation(
        self, input_ids: Tensor, image_input: Tensor, image_mask: Tensor, domain_id: Tensor, num_actions: int
    ) -> Tensor:
        """Everything that does not change across denoising steps: [B, T_ctx, hidden] context tokens."""
        encoded = self.forward_vlm(input_ids, image_input, image_mask)
        return self.transformer.encode_context(domain_id, **encoded, num_actions=num_actions)

    def denoise_step(self, context: Tensor, domain_id: Tensor, x_t: Tensor, proprio: Tensor, t: Tensor) -> Tensor:
        """One denoising pass over the cached context: x0_hat [B, T, dim_action] (`SoftPromptedTransformer.denoise`,
        the graph compile_model compiles). With `encode_observation`, the two graphs the sampler runs, which
        `edge.OnnxRuntimeModel` replaces with their ONNX export."""
        return self.transformer.denoise(context, domain_id, x_t, proprio, t)

    def sample(
        self,
        input_ids: Tensor,
        image_input: Tensor,
        image_mask: Tensor,
        domain_id: Tensor,
        proprio: Tensor,
        x1: Tensor,
        steps: int,
        target: Tensor | None = None,
        weight: Tensor | None = None,
    ) -> Tensor:
        """The re-noising sampler: x_t = t * x1 + (1 - t) * x0_hat for t = 1, (steps - 1) / steps, ...

        The observation is encoded once; each step is one transformer pass over the cached context.
        Returns x0_hat [B, T, dim_action].
        """
        self._new_graph_step()
        context = self.encode_observation(input_ids, image_input, image_mask, domain_id, x1.shape[1])
        mode = self.action_mode
        proprio = mode.mask_inputs(proprio)
        action = torch.zeros_like(x1)
        for i in range(steps, 0, -1):
            t = torch.full((x1.shape[0],), i / steps, device=x1.device, dtype=x1.dtype)
            x_t = t[:, None, None] * x1 + (1 - t)[:, None, None] * action
            self._new_graph_step()
            action = self.denoise_step(context, domain_id, mode.mask_inputs(x_t), proprio, t)
            if target is not None:
                action = action + weight * (target - action)
        # A CUDA graph's output buffer is overwritten by its next replay; the chunk outlives it.
        return action.clone() if self.uses_cuda_graphs else action

    def _new_graph_step(self) -> None:
        """With CUDA graphs, tell torch that the previous replay's outputs are consumed, so their buffers can
        be reused instead of being kept alive (or the graph re-recorded) at every denoising step."""
        if self.uses_cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()


class XVLAPolicy(PreTrainedPolicy):
    """LeRobot policy around `XVLAModel`: batch preparation, action queue, loss, checkpoints."""

    config_class = XVLAConfig
    name = "xvla"

    def __init__(self, config: XVLAConfig, dataset_meta: Any = None, **kwargs: Any) -> None:  # kwargs: dataset_stats
        super().__init__(config)
        if dataset_meta is not None:  # lerobot-train and lerobot-record pass the dataset's metadata
            config.resolve_domain(dataset_meta.robot_type, dataset_meta.repo_id)
            if config.anchor_fps is not None and config.anchor_fps != dataset_meta.fps:
                raise ValueError(f"anchor_fps={config.anchor_fps} but the dataset is recorded at {dataset_meta.fps} fps")
        config.validate_features()
        self.model = XVLAModel(config) if config.inference_backend == "torch" else _onnx_runtime_model(config)
        self._apply_weights_dtype()
        logger.info("X-VLA implementation: lerobot_xvla %s (%s)", __version__, config.action_mode)
        self._loss_term_sums: dict[str, list[float]] = {}  # name -> [sum, steps it was reported]
        self._loss_term_steps = 0
        self._held_out_sums: dict[str, list[float]] = {}
        self.reset()

    def reset(self) -> None:
        self._executor = ChunkExecutor(self.config)

    def _log_loss_terms(self, logs: dict[str, float]) -> None:
        """Running mean of every loss term, logged every `log_loss_terms_every` training steps."""
        every = self.config.log_loss_terms_every
        if every <= 0:
            return
        _accumulate(self._loss_term_sums, logs)
        self._loss_term_steps += 1
        if self._loss_term_steps == every:
            logger.info("X-VLA loss terms (mean of %d steps): %s", every, _means(self._loss_term_sums))
            self._loss_term_steps = 0

    def _log_held_out(self) -> None:
        """lerobot-train's held-out pass (`--dataset.eval_split`) logs only the total loss; the per-term and per-domain
        means of the forward passes made in eval mode are logged at the next training step, or when the checkpoint
        that follows the pass is saved (the last step's pass has no next step)."""
        if self._held_out_sums:
            logger.info("X-VLA held-out loss terms: %s", _means(self._held_out_sums))

    def get_optim_params(self) -> list[dict[str, Any]]:
        """The original's four parameter groups (`training.parameter_groups`)."""
        cfg = self.config
        return parameter_groups(self.model.named_parameters(), cfg.optimizer_lr, cfg.learning_coef, cfg.optimizer_soft_prompt_lr_scale)

    def _get_default_peft_targets(self) -> dict[str, Any]:
        """The paper's LoRA recipe: every linear layer adapted, soft prompts and per-domain heads trained in full."""
        return {
            "target_modules": "all-linear",
            "modules_to_save": ["soft_prompt_hub", "action_encoder", "action_decoder"],
            "r": LORA_RANK,
            "lora_alpha": 2 * LORA_RANK,
        }

    def wrap_with_peft(self, peft_config=None, peft_cli_overrides: dict | None = None):
        """LeRobot's PEFT entry point; LeRobot's default rank (16) stands for "unset" and becomes the recipe's 8.

        With dtype="bfloat16" the frozen matmul and conv weights are stored in bf16: autocast would round them
        to bf16 for every product anyway, so the results are the same and the frozen model takes half the memory.
        """
        overrides = dict(peft_cli_overrides or {})
        if peft_config is None and overrides.get("r") == LEROBOT_DEFAULT_PEFT_RANK:
            overrides.pop("r")
            logger.info("LoRA rank %d (X-VLA recipe); pass --peft.r to choose another", LORA_RANK)
        wrapped = super().wrap_with_peft(peft_config=peft_config, peft_cli_overrides=overrides)
        if self.config.dtype == "bfloat16":
            for module in self.model.modules():
                if isinstance(module, (nn.Linear, nn.Conv2d)) and not module.weight.requires_grad:
                    module.weight.data = module.weight.data.to(torch.bfloat16)
        return wrapped

    # ------------------------------------------------------------------------------------------------------
    # Batch -> model inputs
    # ------------------------------------------------------------------------------------------------------
    def _images(self, batch: dict[str, Tensor], absent_cameras: Collection[str] = ()) -> tuple[Tensor, Tensor]:
        """Views in camera order, resized and padded to num_image_views: images [B, V, 3, H, W], mask [B, V].

        Cameras absent from this call become zero views with a false mask, and so do the slots past the
        cameras (`empty_cameras`, `num_image_views`)."""
        cfg = self.config
        views: list[Tensor | None] = []
        for key in cfg.camera_order:
            if key not in batch:
                if key not in absent_cameras:
                    raise ValueError(
                        f"camera '{key}' is missing from the batch (image keys: {sorted(k for k in batch if 'image' in k)}); "
                        "map your camera names onto the policy's with rename_map (lerobot-train, lerobot-rollout, lerobot-eval: "
                        "--rename_map; lerobot-record: --dataset.rename_map), or when fine-tuning on fewer cameras "
                        "than the checkpoint has, declare the missing ones as empty view slots with --policy.empty_cameras=N"
                    )
                views.append(None)
                continue
            image = batch[key]
            if image.ndim == 5:
                image = image[:, -1]
            if image.ndim != 4 or image.shape[1] != 3 or min(image.shape[-2:]) < 1:
                raise ValueError(f"camera '{key}' has shape {tuple(image.shape)}; expected [B, 3, H, W] (or [B, T, 3, H, W])")
            views.append(self._resize(image))
        reference = next((v for v in views if v is not None), None)
        if reference is None:
            raise ValueError(f"none of the cameras {cfg.camera_order} is in the batch")
        sizes = {key: v.shape[0] for key, v in zip(cfg.camera_order, views, strict=False) if v is not None}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"the cameras have different batch sizes {sizes}; every input needs the same batch size")
        views += [None] * (cfg.num_image_views - len(views))
        zeros = torch.zeros_like(reference)
        images = torch.stack([zeros if v is None else v for v in views], dim=1)
        mask = torch.tensor([v is not None for v in views], device=reference.device).expand(reference.shape[0], -1)
        return images, mask

    def _resize(self, image: Tensor) -> Tensor:
        """[B, 3, h, w] ImageNet-normalised -> [B, 3, H, W] at the network's image size.

        By default a stretch, as the checkpoints were trained: the original resizes the uint8 PIL image with
        `Resize((224, 224), BICUBIC)`. PIL's bicubic is antialiased with a = -0.5, as torch's antialiased
        bicubic; it resizes the width first, then the height, and each pass is stored as uint8, which clips
        the kernel's overshoot at sharp edges. Two clamped passes in that order reproduce it to within one
        uint8 step (PIL's rounding), where a single 2-D pass misses by up to 18 steps at saturated edges.
        With resize_imgs_with_padding: LeRobot's letterbox (bilinear, padded left/top with 0, the mean colour,
        after normalisation), as its built-in X-VLA does.
        """
        height, width = self.config.model_image_size
        if tuple(image.shape[-2:]) == (height, width):
            return image
        if self.config.resize_imgs_with_padding is not None:
            ratio = max(image.shape[-1] / width, image.shape[-2] / height)
            size = (int(image.shape[-2] / ratio), int(image.shape[-1] / ratio))
            image = nn.functional.interpolate(image, size=size, mode="bilinear", align_corners=False)
            return nn.functional.pad(image, (width - size[1], 0, height - size[0], 0))
        low, high = normalized_pixel_range(image)
        for size in ((image.shape[-2], width), (height, width)):
            if tuple(image.shape[-2:]) != size:
                image = nn.functional.interpolate(image, size=size, mode="bicubic", antialias=True, align_corners=False)
                image = torch.maximum(torch.minimum(image, high), low)
        return image

    def _domain_ids(self, batch: dict[str, Any], batch_size: int, device: torch.device) -> Tensor:
        key = next((k for k in (self.config.sample_domain_key, DOMAIN_ID) if k and k in batch), None)
        if key is None:
            return torch.full((batch_size,), self.config.default_domain_id, dtype=torch.long, device=device)
        ids = whole_domain_ids(batch[key], key).reshape(-1)
        if ids.numel() == 1:
            ids = ids.expand(batch_size)
        if ids.numel() != batch_size:
            raise ValueError(f"'{key}' holds {ids.numel()} domain ids for a batch of {batch_size}")
        # Checked while on the CPU, where the preprocessor creates them; checking on an accelerator would stall it.
        if ids.device.type == "cpu" and bool(((ids < 0) | (ids >= self.config.num_domains)).any()):
            raise ValueError(f"'{key}' has domain ids {ids.tolist()} outside [0, num_domains={self.config.num_domains})")
        return ids.to(device)

    def _proprio(self, batch: dict[str, Tensor], batch_size: int, device: torch.device) -> Tensor:
        if self.model.dim_proprio == 0:
            return torch.zeros(batch_size, 0, device=device)
        if OBS_STATE not in batch:
            raise ValueError(f"the batch has no '{OBS_STATE}' (use_proprio=True)")
        state = batch[OBS_STATE]
        if state.ndim not in (2, 3):
            raise ValueError(f"'{OBS_STATE}' has shape {tuple(state.shape)}; expected [B, S] (or [B, T, S])")
        return self._pad_proprio(state[:, -1] if state.ndim == 3 else state)

    def _pad_proprio(self, state: Tensor) -> Tensor:
        """[B, S] -> [B, max_state_dim] (zero padding; a wider state is an error)."""
        width = self.model.dim_proprio
        if state.shape[-1] > width:
            raise ValueError(f"'{OBS_STATE}' has {state.shape[-1]} values; max_state_dim={width}")
        return nn.functional.pad(state, (0, width - state.shape[-1]))

    def _build_model_inputs(self, batch: dict[str, Tensor], absent_cameras: Collection[str] = ()) -> dict[str, Tensor]:
        """A preprocessed batch -> the network's inputs: input_ids [B, L], image_input [B, V, 3, H, W],
        image_mask [B, V], domain_id [B], proprio [B, max_state_dim]. Shapes are checked (which costs no host
        sync); values were checked by the preprocessor while on the CPU."""
        if OBS_LANGUAGE_TOKENS not in batch:
            raise ValueError(f"the batch has no '{OBS_LANGUAGE_TOKENS}': run the X-VLA preprocessor (its tokenizer step)")
        input_ids = batch[OBS_LANGUAGE_TOKENS]
        images, mask = self._images(batch, [*absent_cameras, *self._cameras_outside_domain()])
        batch_size, device = input_ids.shape[0], images.device
        proprio = self._proprio(batch, batch_size, device)
        sizes = {"language tokens": batch_size, "cameras": images.shape[0], OBS_STATE: proprio.shape[0]}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"the batch sizes of the inputs differ: {sizes}; every input needs the same batch size")
        domain_id = self._domain_ids(batch, batch_size, device)
        if self.config.mixture:
            mask = mask & self._mixture_views(domain_id)
        return {"input_ids": input_ids, "image_input": images, "image_mask": mask, "domain_id": domain_id, "proprio": proprio}

    def _cameras_outside_domain(self) -> list[str]:
        """The policy cameras a mixture policy deployed as one domain has no image for: that domain never had them."""
        source = self.config.mixture_domains.get(self.config.domain_id) if self.config.mixture else None
        return [] if source is None else [k for k in self.config.camera_order if k not in source.cameras]

    def _mixture_views(self, domain_id: Tensor) -> Tensor:
        """[B, V] views each sample's domain has a camera for (a mixture's samples carry zeros for the others)."""
        cameras, views = self.config.camera_order, self.config.num_image_views
        rows = torch.ones(self.config.num_domains, views, dtype=torch.bool)
        for domain, source in self.config.mixture_domains.items():
            rows[domain, : len(cameras)] = torch.tensor([key in source.cameras for key in cameras])
        return rows.to(domain_id.device)[domain_id]

    def _anchor_frames(self, domain_id: Tensor | None) -> float | Tensor | None:
        """The time anchors' horizon in frames: the config's, or per sample [B] while a mixture trains (each
        source's horizon at its own fps, looked up by the samples' domain ids); None without time anchors."""
        by_domain = self.config.mixture_anchor_frames if self.config.sample_domain_key == MIXTURE_DOMAIN_KEY else None
        if by_domain is None:
            return self.config.anchor_horizon_frames
        if domain_id is None:
            raise ValueError("a mixture trained with time anchors needs each sample's domain id to find its horizon")
        table = torch.zeros(self.config.num_domains, dtype=torch.float32)
        table[list(by_domain)] = torch.tensor(list(by_domain.values()), dtype=torch.float32)
        return table.to(domain_id.device)[domain_id]

    def _targets(
        self, batch: dict[str, Tensor], domain_id: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Targets [B, chunk_size, dim_action], their valid-step mask [B, chunk_size] (None: all valid) and,
        with time anchors, the trajectory's first point [B, action_dim] that serves as proprio. domain_id [B]:
        the samples' domains, which a mixture trained with time anchors needs."""
        if ACTION not in batch:
            raise ValueError(f"the batch has no '{ACTION}' targets")
        actions = batch[ACTION]
        if actions.ndim == 2:
            actions = actions.unsqueeze(1)
        mode = self.model.action_mode
        if mode.joint_space_robot and actions.shape[-1] != mode.dim_action:
            raise ValueError(
                f"action_mode={mode.name} trains on {mode.dim_action}-D end-effector targets, which its preprocessor "
                f"step xvla_so101_joints_to_ee makes from the joints; got targets of width {actions.shape[-1]}: run the batch "
                "through the policy's preprocessor"
            )
        valid = ~batch[ACTION_IS_PAD].bool() if ACTION_IS_PAD in batch else None
        cfg, dim_action = self.config, self.model.dim_action
        horizon = self._anchor_frames(domain_id)
        if horizon is not None:
            anchors = resample_anchors(actions, valid, horizon, cfg.chunk_size + 1)
            return nn.functional.pad(anchors[:, 1:], (0, dim_action - actions.shape[-1])), None, anchors[:, 0]
        horizon, steps = cfg.chunk_size, actions.shape[1]
        if steps < horizon:
            if valid is None:
                valid = torch.ones(actions.shape[:2], dtype=torch.bool, device=actions.device)
            valid = nn.functional.pad(valid, (0, horizon - steps), value=False)
        actions, valid = actions[:, :horizon], valid[:, :horizon] if valid is not None else None
        padding = (0, dim_action - actions.shape[-1], 0, horizon - actions.shape[1])
        return nn.functional.pad(actions, padding), valid, None

    @property
    def _bf16_weights(self) -> bool:
        return self.config.weights_dtype == "bfloat16"

    def _apply_weights_dtype(self) -> None:
        """weights_dtype="bfloat16": matmul and conv weights in bf16 (half the memory, bf16 kernels), while the
        norms, the positional tables and the residual stream stay fp32 under autocast. Casting whole layers,
        norms included, to bf16 loses about 10x more accuracy over the denoising loop."""
        if self._bf16_weights:
            for module in self.model.modules():
                if isinstance(module, BF16_WEIGHT_LAYERS):
                    module.to(torch.bfloat16)

    def _autocast(self, device: torch.device):
        """bf16 autocast when dtype="bfloat16" (over fp32 master weights) or with bf16 inference weights.

        In training the bf16 copies of the weights are not cached: each weight is used once per forward, and
        the cache would hold a second (bf16) copy of the whole model until the backward pass.
        """
        enabled = self.config.dtype == "bfloat16" or self._bf16_weights
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled, cache_enabled=not self.training)

    # ------------------------------------------------------------------------------------------------------
    # LeRobot policy API
    # ------------------------------------------------------------------------------------------------------
    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        if self.training and self._bf16_weights:
            raise ValueError("weights_dtype=bfloat16 is for inference; train with dtype=bfloat16 (fp32 master weights)")
        inputs = self._build_model_inputs(batch)
        actions, valid, first_point = self._targets(batch, inputs["domain_id"])
        if first_point is not None:  # time anchors: the proprio is the trajectory's first point
            inputs["proprio"] = self._pad_proprio(first_point)
        with self._autocast(actions.device):
            losses = self.model(action=actions, action_valid=valid, **inputs)
        by_domain = {k: losses.pop(k) for k in [k for k in losses if k.startswith(DOMAIN_LOSS)]}
        loss = torch.stack(list(losses.values())).sum()
        values = torch.stack([loss, *losses.values(), *by_domain.values()]).detach().float().cpu().tolist()  # one host sync
        logs = dict(zip(["loss", *losses, *by_domain], values, strict=True))
        if self.training:
            self._log_held_out()
            self._log_loss_terms(logs)
        else:
            _accumulate(self._held_out_sums, logs)
        # Per-domain sums go to our log only: a batch may lack a domain, and LeRobot reduces its metrics across
        # processes key by key.
        return loss, {k: v for k, v in logs.items() if not k.startswith(DOMAIN_LOSS)}

    @torch.no_grad()
    def predict_action_chunk(
        self,
        batch: dict[str, Tensor],
        noise: Tensor | None = None,
        *,
        steps: int | None = None,
        absent_cameras: Collection[str] = (),
        guidance: tuple[Tensor, Tensor] | None = None,
        inference_delay: int | None = None,
        prev_chunk_left_over: Tensor | None = None,
    ) -> Tensor:
        """[B, chunk_size, action_dim] actions in dataset units (before the postprocessor's unnormalisation).

        steps: denoising steps (default num_denoising_steps); absent_cameras: cameras this call has no image
        for (masked views); guidance: see `XVLAModel.generate_actions`. inference_delay and
        prev_chunk_left_over [T, action_dim] are LeRobot's RTC interface (`lerobot-rollout
        --inference.type=rtc`), turned into guidance by `execution.lerobot_rtc_guidance` unless the rtc_config
        that lerobot-rollout sets is disabled: LeRobot then queues the new chunk after the leftover, not over it.
        """
        self.eval()
        if self.config.mixture and self.config.domain_id is None:
            raise ValueError(
                f"a mixture policy acts as one of its domains {sorted(self.config.mixture_domains)}: set domain_id "
                "(--policy.domain_id=N)"
            )
        if steps is None:
            steps = self.config.num_denoising_steps
        elif isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps (denoising steps) must be a whole number >= 1, got {steps!r}")
        inputs = self._build_model_inputs(batch, absent_cameras)
        rtc_config = getattr(self.config, "rtc_config", None)  # set by lerobot-rollout --inference.type=rtc
        if prev_chunk_left_over is not None and (rtc_config is None or rtc_config.enabled):
            if guidance is not None:
                raise ValueError("pass either guidance or prev_chunk_left_over (LeRobot's RTC), not both")
            horizon = self.config.chunk_size
            check_rtc_leftover(prev_chunk_left_over, inference_delay, self.model.action_mode.chunk_width, horizon, inputs["input_ids"].shape[0])
            guidance = lerobot_rtc_guidance(prev_chunk_left_over, inference_delay or 0, horizon, rtc_config)
        with self._autocast(inputs["image_input"].device):
            actions = self.model.generate_actions(**inputs, steps=steps, noise=noise, guidance=guidance)
        return actions.float()

    def supports_rtc(self) -> bool:
        """LeRobot's RTC inference engine executes predicted chunks at the control rate; chunks of time
        anchors are not, so they run with the sync engine (whose select_action interpolates them)."""
        return self.config.time_anchors is None

    @torch.no_grad()
    def select_action(self, batch: dict[str, Tensor], noise: Tensor | None = None) -> Tensor:
        """Next action [B, action_dim]: predicts a chunk when the queue is empty and executes its first
        n_action_steps, with the smoothing options of the config (`execution.py`)."""
        executor = self._executor
        if executor.needs_chunk:
            if self.config.use_predicted_proprio and executor.last_action is not None:
                batch = {**batch, OBS_STATE: executor.last_action}
            guidance = executor.guidance(self.config.chunk_size)
            executor.add_chunk(self.predict_action_chunk(batch, noise=noise, guidance=guidance))
        return executor.next_action()

    # ------------------------------------------------------------------------------------------------------
    # Checkpoints
    # ------------------------------------------------------------------------------------------------------
    def _save_pretrained(self, save_directory: Path, state_dict: dict[str, Tensor] | None = None) -> None:
        """config.json plus model.safetensors in the layout of the installed LeRobot's built-in X-VLA, which
        loads it. state_dict: weights gathered by the caller (LeRobot >= 0.6 passes them, e.g. under FSDP)."""
        self._log_held_out()
        self.config._save_pretrained(save_directory)
        if self.config.inference_backend == "onnxruntime":  # an export: its graphs instead of weights
            self.model.save_graphs(Path(save_directory))
            return
        model = self.module if hasattr(self, "module") else self
        vocab = model.model.vlm.get_input_embeddings().num_embeddings
        weights = model.state_dict() if state_dict is None else state_dict
        save_file(to_saved_layout(weights, vocab), str(Path(save_directory) / "model.safetensors"))

    @classmethod
    def from_pretrained(
        cls,
        pretrained_name_or_path: str | Path,
        *,
        config: PreTrainedConfig | None = None,
        force_download: bool = False,
        resume_download: bool | None = None,
        proxies: dict | None = None,
        token: str | bool | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        revision: str | None = None,
        strict: bool = True,
        **kwargs: Any,
    ) -> XVLAPolicy:
        """Load any X-VLA checkpoint: LeRobot 0.4.x, LeRobot >= 0.6 or the original 2toINF/X-VLA format.

        Keys and shapes must match the config exactly; `config.checkpoint_reinit` names the parts that may
        differ on purpose. `strict` is accepted for LeRobot's signature; loading is always strict.
        """
        directory = _checkpoint_directory(
            pretrained_name_or_path,
            force_download=force_download,
            proxies=proxies,
            token=token,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            revision=revision,
        )
        if config is None:
            config = load_config(directory)
        if not isinstance(kwargs.get("dataset_meta"), MixtureMetadata):  # only lerobot-train on a mixture passes one
            config.require_deployed_domain()  # lerobot-rollout loads policies here, not through make_policy
        if config.inference_backend != "onnxruntime" and not (directory / "model.safetensors").is_file():
            raise CheckpointNotFoundError(f"{str(directory)!r} has a config.json but no model.safetensors: not a complete X-VLA checkpoint")
        if config.inference_backend == "onnxruntime":  # `lerobot-xvla export`: two ONNX graphs, no torch weights
            policy = cls(config, **kwargs)
            policy.model.load_graphs(directory)
            return policy.eval()
        state_dict = load_file(str(directory / "model.safetensors"))
        config.florence_config = checkpoint_florence_config(config.florence_config, directory, state_dict)
        policy = cls(config, **kwargs)
        load_state_dict_strict(policy, state_dict, reinit=config.checkpoint_reinit)
        if config.init_domain_from is not None:
            policy.model.transformer.copy_domain(config.init_domain_from, config.domain_id)
            logger.info("domain %s initialised from pretrained domain %d", config.domain_id, config.init_domain_from)
            config.init_domain_from = None  # once: checkpoints saved from here on hold the trained domain
        policy._apply_weights_dtype()
        policy.to(config.device)
        policy.eval()
        return policy


def _accumulate(sums: dict[str, list[float]], values: dict[str, float]) -> None:
    for name, value in values.items():
        total = sums.setdefault(name, [0.0, 0])
        total[0] += value
        total[1] += 1


def _means(sums: dict[str, list[float]]) -> str:
    """"name=mean, ..." of the accumulated values, which are then cleared."""
    text = ", ".join(f"{k}={total / count:.4g}" for k, (total, count) in sums.items())
    sums.clear()
    return text


def _onnx_runtime_model(config: XVLAConfig) -> nn.Module:
    """The sampler over the exported graphs (imported here: ONNX Runtime is the optional `edge` extra)."""
    from .edge import OnnxRuntimeModel

    return OnnxRuntimeModel(config)


def load_config(directory: Path, **kwargs: Any) -> XVLAConfig:
    """Config of a local checkpoint directory, in LeRobot's format or the original one; its tokenizer_name
    points at the tokenizer files the checkpoint carries, wherever the directory now is. A directory holding a
    link that resolves outside it (the Hub cache's links into its blobs are inside) is refused before any file is
    read (`processor_files.refuse_outside`)."""
    refuse_outside(directory, directory, "the checkpoint file")
    with open(directory / "config.json") as f:
        raw = json.load(f)
    if not is_original_config(raw):
        config = PreTrainedConfig.from_pretrained(directory, **kwargs)
        config.tokenizer_name = resolve_tokenizer_name(config.tokenizer_name, directory)
        return config
    converted = original_config_to_lerobot(raw)
    if any((directory / name).exists() for name in TOKENIZER_FILES):  # the checkpoint ships its tokenizer
        converted["tokenizer_name"] = str(directory)
    return XVLAConfig(**converted)


def load_for_inference(checkpoint: str | Path, device: str = "cpu", **config_overrides: Any) -> tuple[XVLAPolicy, Any, Any]:
    """(policy, preprocessor, postprocessor) of a checkpoint directory or Hub id, on `device`.

    config_overrides set config fields before the policy is built (n_action_steps, rtc_guidance, ...).
    Checkpoints in the original format carry no processor files: fresh processors are built (no normalisation).
    """
    from lerobot.policies import factory  # looked up at call time: the make_pre_post_processors we wrap

    checkpoint = _checkpoint_directory(checkpoint)
    config = load_config(checkpoint)
    config.device = device
    fields = {f.name for f in dataclasses.fields(config)}
    for name, value in config_overrides.items():
        if name not in fields:
            raise XVLAConfigError(f"load_for_inference got {name}={value!r}, which is not an XVLAConfig field")
        setattr(config, name, value)
    config.validate()
    config.act_as_domain()
    policy = XVLAPolicy.from_pretrained(checkpoint, config=config)
    saved = (checkpoint / f"{POLICY_PREPROCESSOR_DEFAULT_NAME}.json").exists()
    preprocessor, postprocessor = factory.make_pre_post_processors(
        config,
        pretrained_path=str(checkpoint) if saved else None,
        preprocessor_overrides={"device_processor": {"device": device}},
    )
    return policy, preprocessor, postprocessor


class CheckpointNotFoundError(FileNotFoundError):
    """A checkpoint name that is neither an X-VLA checkpoint directory nor a Hub checkpoint that can be had."""


def _checkpoint_directory(name_or_path: str | Path, **hub_kwargs: Any) -> Path:
    """A local directory holding config.json, model.safetensors and, where the checkpoint has them, its
    processor and tokenizer files (downloaded from the Hub if needed). Anything else raises
    CheckpointNotFoundError saying which it is: a missing path, a file, a directory without config.json, a Hub
    id not in the offline cache or not on the Hub."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError
    from huggingface_hub.utils import validate_repo_id

    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointNotFoundError(f"{str(name_or_path)!r} is a directory but not an X-VLA checkpoint: it has no config.json")
        return path
    if path.exists():
        raise CheckpointNotFoundError(f"{str(name_or_path)!r} is a file; expected a checkpoint directory (config.json, model.safetensors) or a Hub id")
    try:
        validate_repo_id(str(name_or_path))
    except HFValidationError:
        raise CheckpointNotFoundError(f"{str(name_or_path)!r} does not exist (and is not a Hub id)") from None
    hub_kwargs = {k: v for k, v in hub_kwargs.items() if v is not None}
    try:
        return Path(
            snapshot_download(
                repo_id=str(name_or_path),
                allow_patterns=[
                    "config.json",
                    "model.safetensors",
                    "*.json",
                    "*.txt",
                    f"{POLICY_PREPROCESSOR_DEFAULT_NAME}*",
                    f"{POLICY_POSTPROCESSOR_DEFAULT_NAME}*",
                    f"{TOKENIZER_DIR}/*",
                ],
                **hub_kwargs,
            )
        )
    except LocalEntryNotFoundError:
        raise CheckpointNotFoundError(
            f"{str(name_or_path)!r} is not a directory here, and as a Hub id it is not in the local Hugging Face cache "
            "(offline: HF_HUB_OFFLINE=1, or the Hub cannot be reached)"
        ) from None
    except RepositoryNotFoundError:
        raise CheckpointNotFoundError(
            f"{str(name_or_path)!r} is not a directory here, nor a Hub repository you can read (private ones need `hf auth login`)"
        ) from None
