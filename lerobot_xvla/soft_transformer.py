"""The soft-prompted transformer of X-VLA (reference: 2toinf/X-VLA@6bc2513 models/transformer.py).

Token layout of one denoising pass, for T_a action tokens and the encoded context::

    [ action (T_a) | vlm_proj(vlm features) | aux_visual_proj(aux views) ] + pos_emb[:seq]
    then soft_prompts[domain] (len_soft_prompts tokens, no positional embedding) appended at the end
    -> depth x pre-LN block (bidirectional, no mask) -> LayerNorm -> first T_a tokens -> action_decoder

(the last block computes only the first T_a tokens past its attention: the same result with less work.)

Parameter names and memory layouts equal the original's, so its checkpoints load unchanged.
Everything that does not depend on the noisy action (the context projections, their positional
embeddings and the soft prompts) is computed once by `encode_context` and reused by every `denoise` call.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 100.0) -> torch.Tensor:
    """Sinusoidal embedding of flow time t in [0, 1] (not scaled by 1000): [B] -> [B, dim] as [cos | sin]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=t.dtype, device=t.device) / half)
    args = t[:, None] * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


class DomainAwareLinear(nn.Module):
    """A linear layer with one weight matrix and bias per domain (embodiment).

    The weights live in `fc: nn.Embedding(num_domains, in_features * out_features)`, each row viewed as an
    `[in_features, out_features]` matrix (y = x @ W[d] + b[d]): the layout of the released checkpoints.
    Xavier-uniform on the whole [num_domains, in*out] table, as the original does, makes fresh heads about
    8x smaller than a standard Linear.
    """

    def __init__(self, in_features: int, out_features: int, num_domains: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.fc = nn.Embedding(num_domains, in_features * out_features)
        self.bias = nn.Embedding(num_domains, out_features)
        nn.init.xavier_uniform_(self.fc.weight)
        nn.init.zeros_(self.bias.weight)

    def forward(self, x: torch.Tensor, domain_id: torch.Tensor) -> torch.Tensor:
        """x: [B, T, in_features], domain_id: [B] long -> [B, T, out_features]."""
        weight = self.fc(domain_id).view(-1, self.in_features, self.out_features)
        return torch.baddbmm(self.bias(domain_id).unsqueeze(1), x, weight)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection and PyTorch's fused SDPA kernel."""

    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.1) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, num_queries: int | None = None) -> torch.Tensor:
        """x [B, S, D] -> [B, num_queries or S, D]: every token is attended to, the first num_queries attend."""
        batch, seq, dim = x.shape
        q, k, v = self.qkv(x).view(batch, seq, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        q = q[:, :, :num_queries]
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj(x.transpose(1, 2).flatten(2))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.1) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x), approximate="tanh"))))


class TransformerBlock(nn.Module):
    """Pre-LN block: x + Attn(LN(x)), then x + MLP(LN(x)).

    With num_outputs, only the first num_outputs tokens are computed past the attention (they still attend
    to every token): the last block of the denoiser only needs the action tokens.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))

    def forward(self, x: torch.Tensor, num_outputs: int | None = None) -> torch.Tensor:
        x = x[:, :num_outputs] + self.attn(self.norm1(x), num_outputs)
        return x + self.mlp(self.norm2(x))


class SoftPromptedTransformer(nn.Module):
    """Domain-aware transformer that denoises an action chunk given the encoded observation."""

    def __init__(
        self,
        hidden_size: int,
        multi_modal_input_size: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        num_domains: int,
        dim_action: int,
        dim_proprio: int,
        dim_time: int,
        len_soft_prompts: int,
        max_len_seq: int,
        use_hetero_proj: bool,
    ) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.dim_time = dim_time
        self.len_soft_prompts = len_soft_prompts
        self.use_hetero_proj = use_hetero_proj

        self.blocks = nn.ModuleList(TransformerBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        if use_hetero_proj:
            self.vlm_proj = DomainAwareLinear(multi_modal_input_size, hidden_size, num_domains)
            self.aux_visual_proj = DomainAwareLinear(multi_modal_input_size, hidden_size, num_domains)
        else:
            self.vlm_proj = nn.Linear(multi_modal_input_size, hidden_size)
            self.aux_visual_proj = nn.Linear(multi_modal_input_size, hidden_size)
        self.pos_emb = nn.Parameter(torch.empty(1, max_len_seq, hidden_size))
        self.norm = nn.LayerNorm(hidden_size)
        self.action_encoder = DomainAwareLinear(dim_action + dim_time + dim_proprio, hidden_size, num_domains)
        self.action_decoder = DomainAwareLinear(hidden_size, dim_action, num_domains)
        if len_soft_prompts > 0:
            self.soft_prompt_hub = nn.Embedding(num_domains, len_soft_prompts * hidden_size)
            nn.init.normal_(self.soft_prompt_hub.weight, std=0.02)
        nn.init.normal_(self.pos_emb, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    @torch.no_grad()
    def copy_domain(self, source: int, target: int) -> None:
        """Start domain `target` from domain `source`: its soft prompts and every per-domain layer."""
        tables = [table for m in self.modules() if isinstance(m, DomainAwareLinear) for table in (m.fc, m.bias)]
        if self.len_soft_prompts > 0:
            tables.append(self.soft_prompt_hub)
        for table in tables:
            table.weight[target] = table.weight[source]

    @property
    def max_len_seq(self) -> int:
        return self.pos_emb.shape[1]

    def _project(self, proj: nn.Module, features: torch.Tensor, domain_id: torch.Tensor) -> torch.Tensor:
        return proj(features, domain_id) if self.use_hetero_proj else proj(features)

    def encode_context(
        self,
        domain_id: torch.Tensor,
        vlm_features: torch.Tensor,
        aux_visual_inputs: torch.Tensor,
        num_actions: int,
    ) -> torch.Tensor:
        """Step-invariant tokens: [B, T_vlm + T_aux + len_soft_prompts, H].

        domain_id [B]; vlm_features [B, T_vlm, D]; aux_visual_inputs [B, T_aux, D]. The context positions
        start after the `num_actions` action tokens, as in the original concatenation.
        """
        context = torch.cat(
            [
                self._project(self.vlm_proj, vlm_features, domain_id),
                self._project(self.aux_visual_proj, aux_visual_inputs, domain_id),
            ],
            dim=1,
        )
        seq_len = num_actions + context.shape[1]
        if seq_len > self.max_len_seq:
            raise ValueError(
                f"X-VLA sequence of {seq_len} tokens ({num_actions} actions + {vlm_features.shape[1]} image and text "
                f"tokens + {aux_visual_inputs.shape[1]} auxiliary-view tokens) exceeds max_len_seq={self.max_len_seq}: "
                "use fewer or smaller camera views, a shorter chunk or tokenizer_max_length"
            )
        context = context + self.pos_emb[:, num_actions:seq_len]
        if self.len_soft_prompts > 0:
            prompts = self.soft_prompt_hub(domain_id).view(-1, self.len_soft_prompts, self.hidden_size)
            context = torch.cat([context, prompts], dim=1)
        return context

    def denoise(
        self,
        context: torch.Tensor,
        domain_id: torch.Tensor,
        action_with_noise: torch.Tensor,
        proprio: torch.Tensor,
        t: torch.Tensor,
    ) -> torch.Tensor:
        """Predict the clean action chunk.

        context [B, T_ctx, H] from `encode_context`; action_with_noise [B, T_a, dim_action];
        proprio [B, dim_proprio]; t [B] flow time (1 = noise). Returns [B, T_a, dim_action].
        """
        batch, num_actions = action_with_noise.shape[:2]
        time = timestep_embedding(t, self.dim_time).to(action_with_noise.dtype)
        tokens = torch.cat(
            [
                action_with_noise,
                proprio.unsqueeze(1).expand(batch, num_actions, proprio.shape[-1]),
                time.unsqueeze(1).expand(batch, num_actions, self.dim_time),
            ],
            dim=-1,
        )
        x = self.action_encoder(tokens, domain_id) + self.pos_emb[:, :num_actions]
        x = torch.cat([x, context], dim=1)
        for block in self.blocks[:-1]:
            x = block(x)
        x = self.blocks[-1](x, num_outputs=num_actions)  # only the action tokens are decoded
        return self.action_decoder(self.norm(x), domain_id)

    def forward(
        self,
        domain_id: torch.Tensor,
        vlm_features: torch.Tensor,
        aux_visual_inputs: torch.Tensor,
        action_with_noise: torch.Tensor,
        proprio: torch.Tensor,
        t: torch.Tensor,
    ) -> torch.Tensor:
        """The original single-call interface: encode the context, then denoise once."""
        context = self.encode_context(domain_id, vlm_features, aux_visual_inputs, action_with_noise.shape[1])
        return self.denoise(context, domain_id, action_with_noise, proprio, t)
