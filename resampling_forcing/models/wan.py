"""A causal Wan2.1 video DiT with per-chunk timesteps.

The architecture and parameter names follow the original Wan2.1 release (`patch_embedding`,
`blocks.N.self_attn.q`, `head.head`, ...), so original checkpoints load by name and diffusers
checkpoints by a fixed renaming (models/loading.py). Nothing new is added to Wan: causality
lives entirely in the attention op passed to `forward`, and per-chunk timesteps reuse Wan's
modulation with one timestep per group of tokens instead of one per sample.

Shapes: latents [B, C, F, H, W]; tokens [B, L, dim] ordered (frame, row, column); q/k/v
[B, Hh, L, D]. A "group" is a run of whole latent frames sharing one timestep (a chunk).
"""
from __future__ import annotations

import math
from typing import Callable, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..attention.masks import dual_history_chunks
from ..config import ModelConfig
from ..diffusion import velocity_from_x0

# Wan embeds timesteps on its 0..1000 training scale; the library works with t in [0, 1].
WAN_TIMESTEP_SCALE = 1000.0


class AttentionOp(Protocol):
    """How self-attention is computed: q, k, v [B, Hh, L, D] -> [B, Hh, L, D] for block `layer`."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor: ...


def full_attention(q, k, v, layer):
    """Unmasked self-attention (the AttentionOp of a bidirectional forward): q, k, v [B, Hh, L, D] -> [B, Hh, L, D]."""
    return F.scaled_dot_product_attention(q, k, v)


# ----------------------------------------------------------------------------- building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in fp32 (Wan does this for stability in bf16), weights included."""

    def forward(self, x):
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).type_as(x)


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Wan's timestep embedding [cos | sin] in float64. t: any shape -> t.shape + [dim]."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = t.to(torch.float64)[..., None] * freqs
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Head-dim split between the frame, row and column axes (as Wan2.1)."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def _axis_freqs(d: int, theta: float, device=None) -> torch.Tensor:
    """Angle per unit position [d/2] (float64) of the d rotary dims of one axis."""
    return 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=device) / d)


def rope_frame_freqs(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """Angle per (patched) frame of the frame axis's rotary pairs [F/2] (float64): the first F/2 pairs of
    a head (rope_cos_sin's order). Rotating those pairs of a key by `s * rope_frame_freqs` moves it s
    frames later; its row and column pairs stay."""
    return _axis_freqs(rope_axis_dims(head_dim)[0], theta, device)


def rope_cos_sin(frame_pos: torch.Tensor, rows: int, cols: int, head_dim: int, theta: float):
    """cos/sin [L, D/2] for tokens on a (frame, row, column) grid.

    Angles are computed from absolute positions (no precomputed table), so a rollout of any
    length gets exact positions without wrapping or indexing past a table.
    frame_pos: [F'] integer frame positions (after temporal patching)."""
    device = frame_pos.device
    parts = []
    grids = [
        frame_pos.to(torch.float64),
        torch.arange(rows, dtype=torch.float64, device=device),
        torch.arange(cols, dtype=torch.float64, device=device),
    ]
    for pos, d in zip(grids, rope_axis_dims(head_dim)):
        parts.append(torch.outer(pos, _axis_freqs(d, theta, device)))
    fa, ra, ca = parts
    n_f, n_r, n_c = fa.shape[0], ra.shape[0], ca.shape[0]
    angles = torch.cat([
        fa[:, None, None, :].expand(n_f, n_r, n_c, -1),
        ra[None, :, None, :].expand(n_f, n_r, n_c, -1),
        ca[None, None, :, :].expand(n_f, n_r, n_c, -1),
    ], dim=-1).reshape(n_f * n_r * n_c, -1)
    return torch.cos(angles).float(), torch.sin(angles).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs of x [B, Hh, L, D] by angles with cos/sin [L, D/2] (fp32)."""
    rot = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(rot * torch.complex(cos, sin)).flatten(-2).type_as(x)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()

    def qkv(self, x, cos, sin):
        """x [B, L, dim] -> q, k, v [B, Hh, L, D], RoPE applied to q and k."""
        q = self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
        k = self.norm_k(self.k(x)).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
        v = self.v(x).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
        # Under autocast the qk-norm's fp32 weight promotes q, k to fp32 while v stays in the autocast
        # dtype; attention then runs in v's dtype (what SDPA under autocast does), so every attention op
        # (KV cache, routed kernels, FlexAttention) gets one dtype. A no-op without autocast.
        return apply_rope(q, cos, sin).to(v.dtype), apply_rope(k, cos, sin).to(v.dtype), v

    def forward(self, x, cos, sin, attn: AttentionOp, layer: int):
        q, k, v = self.qkv(x, cos, sin)
        out = attn(q, k, v, layer)
        return self.o(out.transpose(1, 2).flatten(2))


class CrossAttention(nn.Module):
    """Text cross-attention. K/V of the text depend only on the prompt: cacheable per rollout."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()

    def kv(self, context):
        """context [B, Lt, dim] -> k, v [B, Hh, Lt, D]."""
        k = self.norm_k(self.k(context)).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
        v = self.v(context).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
        return k, v

    def forward(self, x, kv):
        q = self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, *kv)
        return self.o(out.transpose(1, 2).flatten(2))


def _modulate(x_groups, shift, scale):
    return x_groups * (1 + scale) + shift


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        dim = cfg.dim
        self.norm1 = LayerNorm32(dim, cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(dim, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.norm3 = LayerNorm32(dim, cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(dim, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.norm2 = LayerNorm32(dim, cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x, e0, cos, sin, text_kv, attn: AttentionOp, layer: int):
        """x [B, L, dim]; e0 [B, G, 6, dim] fp32 modulation per group of L/G tokens."""
        b, length, dim = x.shape
        groups = e0.shape[1]
        mod = (self.modulation.float() + e0).unsqueeze(2)  # [B, G, 1, 6, dim]
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.unbind(3)

        def grouped(t):  # [B, L, dim] -> [B, G, L/G, dim]
            return t.view(b, groups, length // groups, dim)

        h = _modulate(grouped(self.norm1(x.float())), shift1, scale1).view(b, length, dim).type_as(x)
        y = self.self_attn(h, cos, sin, attn, layer)
        x = (grouped(x.float()) + grouped(y) * gate1).view(b, length, dim).type_as(x)
        x = x + self.cross_attn(self.norm3(x.float()).type_as(x), text_kv)
        h = _modulate(grouped(self.norm2(x.float())), shift2, scale2).view(b, length, dim).type_as(x)
        y = self.ffn(h)
        return (grouped(x.float()) + grouped(y.float()) * gate2).view(b, length, dim).type_as(x)


class Head(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = LayerNorm32(cfg.dim, cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, cfg.out_channels * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x, e):
        """x [B, L, dim]; e [B, G, dim] fp32 time embedding per group."""
        b, length, dim = x.shape
        groups = e.shape[1]
        shift, scale = (self.modulation.float() + e.unsqueeze(2)).unsqueeze(2).unbind(3)
        h = _modulate(self.norm(x.float()).view(b, groups, length // groups, dim), shift, scale)
        return self.head(h.view(b, length, dim).type_as(x))


# ----------------------------------------------------------------------------- the model


class CausalWanModel(nn.Module):
    """Wan2.1 DiT whose attention pattern and per-group timesteps are chosen by the caller."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.head_dim = cfg.head_dim
        self.patch_embedding = nn.Conv3d(cfg.in_channels, cfg.dim, kernel_size=tuple(cfg.patch_size),
                                         stride=tuple(cfg.patch_size))
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(cfg.dim, cfg.dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, cfg.dim * 6))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)

    # -- geometry --------------------------------------------------------------------------

    def tokens_per_frame(self, height: int, width: int) -> int:
        """Tokens per latent frame for latents of spatial size height x width."""
        _, ph, pw = self.cfg.patch_size
        return (height // ph) * (width // pw)

    def chunk_tokens(self, height: int, width: int) -> int:
        return self.cfg.chunk_tokens(height, width)

    def _check_latents(self, x: torch.Tensor) -> None:
        if x.dim() != 5 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"latents must be [B, {self.cfg.in_channels}, F, H, W]; got {list(x.shape)}")
        pt, ph, pw = self.cfg.patch_size
        if x.shape[2] % pt or x.shape[3] % ph or x.shape[4] % pw:
            raise ValueError(f"latent shape {list(x.shape[2:])} is not divisible by patch {self.cfg.patch_size}")

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, F, H, W] -> tokens [B, L, dim]."""
        self._check_latents(x)
        return self.patch_embedding(x).flatten(2).transpose(1, 2).contiguous()

    def unpatchify(self, tokens: torch.Tensor, frames: int, height: int, width: int) -> torch.Tensor:
        """Head output [B, L, C_out * pt * ph * pw] -> [B, C_out, F, H, W] (Wan's channel order)."""
        pt, ph, pw = self.cfg.patch_size
        b = tokens.shape[0]
        x = tokens.reshape(b, frames // pt, height // ph, width // pw, pt, ph, pw, -1)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, -1, frames, height, width)

    def rope(self, frame_pos: torch.Tensor, height: int, width: int):
        """cos/sin [L, D/2] for latent frames at positions frame_pos [F] (multiples of pt)."""
        pt, ph, pw = self.cfg.patch_size
        return rope_cos_sin(frame_pos[::pt] // pt, height // ph, width // pw, self.head_dim, self.cfg.rope_theta)

    # -- conditioning ----------------------------------------------------------------------

    def time_embed(self, t: torch.Tensor):
        """t [B, G] in [0, 1] -> (e [B, G, dim], e0 [B, G, 6, dim]), both fp32."""
        freq = sinusoidal_embedding(t * WAN_TIMESTEP_SCALE, self.cfg.freq_dim)
        dtype = self.time_embedding[0].weight.dtype
        e = self.time_embedding(freq.to(dtype))
        e0 = self.time_projection(e).unflatten(-1, (6, -1))
        return e.float(), e0.float()

    def text_kv(self, context: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-block cross-attention K/V of the text [B, Lt, text_dim]; computed once per prompt."""
        ctx = self.text_embedding(context.to(self.text_embedding[0].weight.dtype))
        return [blk.cross_attn.kv(ctx) for blk in self.blocks]

    # -- forward ---------------------------------------------------------------------------

    def run_tokens(self, tokens, t_groups, cos, sin, text_kv, attn: AttentionOp) -> torch.Tensor:
        """Blocks + head on a token sequence. tokens [B, L, dim]; t_groups [B, G] (L % G == 0).
        Returns the head output [B, L, C_out * prod(patch)]."""
        if tokens.shape[1] % t_groups.shape[1]:
            raise ValueError(f"{tokens.shape[1]} tokens cannot be split into {t_groups.shape[1]} timestep groups")
        e, e0 = self.time_embed(t_groups)
        x = tokens
        for i, blk in enumerate(self.blocks):
            if self.cfg.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, e0, cos, sin, text_kv[i], attn, i, use_reentrant=False)
            else:
                x = blk(x, e0, cos, sin, text_kv[i], attn, i)
        return self.head(x, e)

    def to_velocity(self, raw: torch.Tensor, x_t: torch.Tensor, t_frames: torch.Tensor) -> torch.Tensor:
        """Network output -> velocity. t_frames [B, F] (one t per latent frame)."""
        if self.cfg.prediction == "velocity":
            return raw
        return velocity_from_x0(x_t.transpose(1, 2), raw.transpose(1, 2), t_frames,
                                self.cfg.x0_min_t).transpose(1, 2)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None, *,
                attn: AttentionOp | Callable = full_attention, frame_offset: int = 0,
                text_kv: list | None = None) -> torch.Tensor:
        """Velocity for latents x [B, C, F, H, W] at timesteps t.

        t: [B] (one per sample) or [B, G] (one per group of F/G latent frames, e.g. per chunk).
        context: text embeddings [B, Lt, text_dim] (or pass precomputed `text_kv`).
        attn: the attention op (default: full bidirectional attention, as plain Wan).
        frame_offset: RoPE frame position of the first frame (a chunk's place in a rollout)."""
        b, _, frames, height, width = x.shape
        t = t.reshape(b, -1).float()
        if frames % t.shape[1]:
            raise ValueError(f"{frames} latent frames cannot be split into {t.shape[1]} timestep groups")
        text_kv = text_kv if text_kv is not None else self.text_kv(context)
        frame_pos = torch.arange(frame_offset, frame_offset + frames, device=x.device)
        cos, sin = self.rope(frame_pos, height, width)
        raw = self.run_tokens(self.patchify(x), t, cos, sin, text_kv, attn)
        raw = self.unpatchify(raw, frames, height, width)
        t_frames = t.repeat_interleave(frames // t.shape[1], dim=1)
        return self.to_velocity(raw, x, t_frames)

    def forward_dual(self, history: torch.Tensor, noisy: torch.Tensor, t: torch.Tensor,
                     context: torch.Tensor, attn: AttentionOp, history_t: torch.Tensor | None = None) -> torch.Tensor:
        """Training forward on [H_1..H_{N-1} | Q_1..Q_N] in one pass (method.md section 3).

        history, noisy: [B, C, F, H, W] with F = N * chunk_frames; t: [B, N] noisy-chunk timesteps;
        history_t: [B, N] history timesteps (default 0: clean). H_j and Q_j share RoPE positions.
        The last history chunk is not run: no noisy chunk attends it (masks.dual_history_chunks).
        attn must implement the dual-stream mask. Returns the velocity for the noisy half."""
        b, _, frames, height, width = noisy.shape
        if history.shape != noisy.shape:
            raise ValueError(f"history {list(history.shape)} and noisy {list(noisy.shape)} must match")
        n = frames // self.cfg.chunk_frames
        if n * self.cfg.chunk_frames != frames or t.shape != (b, n):
            raise ValueError(f"{frames} latent frames need t of shape [{b}, {frames // self.cfg.chunk_frames}] "
                             f"with chunk_frames={self.cfg.chunk_frames}; got t {list(t.shape)}")
        history_t = torch.zeros_like(t) if history_t is None else history_t
        nh = dual_history_chunks(n)
        frame_pos = torch.arange(frames, device=noisy.device)
        cos, sin = self.rope(frame_pos, height, width)
        noisy_tokens = self.patchify(noisy)
        h_len = nh * (noisy_tokens.shape[1] // n)  # history tokens
        parts = [self.patchify(history[:, :, : nh * self.cfg.chunk_frames])] if nh else []
        tokens = torch.cat(parts + [noisy_tokens], dim=1)
        t_groups = torch.cat([history_t[:, :nh], t], dim=1).float()
        raw = self.run_tokens(tokens, t_groups, torch.cat([cos[:h_len], cos]), torch.cat([sin[:h_len], sin]),
                              self.text_kv(context), attn)
        raw = self.unpatchify(raw[:, h_len:], frames, height, width)
        return self.to_velocity(raw, noisy, t.float().repeat_interleave(self.cfg.chunk_frames, dim=1))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
