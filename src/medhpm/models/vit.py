"""The 3D Vision Transformer encoder shared by HPM pre-training and UNETR fine-tuning.

Reads top to bottom like the figure: patchify / unpatchify (the one token order), the 3D sin-cos
position embedding, the building blocks (DropPath, MLP, Attention, Block), the encoder, presets.

Token order (the contract of the whole package): a volume laid out ``(B, C, H, W, D)`` with patch size
``P`` has a token grid ``(Gh, Gw, Gd) = (H/P, W/P, D/P)``; token ``(ih, iw, id)`` has index
``(ih * Gw + iw) * Gd + id``. This is exactly the order of ``Conv3d(..., k=P, s=P)(x).flatten(2)``, so the
patch embedding, the reconstruction targets, the per-patch losses and UNETR's token reshape agree.
Inside one patch the voxels are flattened in ``(ph, pw, pd, C)`` order.

The encoder knows nothing about pre-training: masking, decoders and the teacher live in ``hpm.py``.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from medhpm.config import ENCODER_PRESETS as PRESETS

__all__ = [
    "patchify",
    "unpatchify",
    "sincos_pos_embed_3d",
    "DropPath",
    "Mlp",
    "Attention",
    "Block",
    "PatchEmbed3d",
    "ViTEncoder",
    "PRESETS",
    "build_encoder",
]


# ----------------------------------------------------------------------------------------------------
# helpers: the token order
# ----------------------------------------------------------------------------------------------------
def _as_triple(value: int | Sequence[int], name: str) -> tuple[int, int, int]:
    """Turn an int or a 3-sequence of positive ints into a tuple, or raise ValueError naming ``name``."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = (value, value, value)
    try:  # a bool is iterated on purpose: its TypeError becomes the ValueError below
        triple = tuple(int(v) for v in value)  # type: ignore[union-attr]
    except TypeError as err:
        raise ValueError(f"{name} must be an int or a sequence of 3 ints, got {value!r}.") from err
    if len(triple) != 3 or any(v != w for v, w in zip(triple, value, strict=True)) or min(triple) < 1:  # type: ignore[arg-type]
        raise ValueError(f"{name} must be 3 positive integers (H, W, D), got {value!r}.")
    return triple


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Cut a volume into flattened patches in the package's token order.

    Args:
        x: ``(B, C, H, W, D)``; H, W and D must be divisible by ``patch_size``.
        patch_size: edge ``P`` of a cubic patch.
    Returns:
        ``(B, N, P^3 * C)`` with ``N = (H/P)(W/P)(D/P)``, token ``(ih*Gw + iw)*Gd + id``, voxels inside a
        patch in ``(ph, pw, pd, C)`` order.
    """
    if x.dim() != 5:
        raise ValueError(f"patchify expects a (B, C, H, W, D) tensor, got shape {tuple(x.shape)}.")
    b, c, h, w, d = x.shape
    p = int(patch_size)
    if p < 1 or h % p or w % p or d % p:
        raise ValueError(f"patchify: spatial size {(h, w, d)} is not divisible by patch_size {patch_size}.")
    gh, gw, gd = h // p, w // p, d // p
    x = x.reshape(b, c, gh, p, gw, p, gd, p)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # (B, Gh, Gw, Gd, ph, pw, pd, C)
    return x.reshape(b, gh * gw * gd, p**3 * c)


def unpatchify(tokens: torch.Tensor, patch_size: int, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`patchify`.

    Args:
        tokens: ``(B, N, P^3 * C)`` in the package's token order.
        patch_size: edge ``P`` of a cubic patch.
        shape: the volume shape to rebuild, either ``(C, H, W, D)`` or ``(B, C, H, W, D)`` (the batch
            size is then checked against ``tokens``; in both forms B is taken from ``tokens``).
    Returns:
        ``(B, C, H, W, D)``.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) == 5:
        if shape[0] != tokens.shape[0]:
            raise ValueError(f"unpatchify: shape {shape} has batch {shape[0]}, tokens have {tokens.shape[0]}.")
        shape = shape[1:]
    if len(shape) != 4:
        raise ValueError(f"unpatchify: shape must be (C, H, W, D) or (B, C, H, W, D), got {shape}.")
    if tokens.dim() != 3:
        raise ValueError(f"unpatchify expects (B, N, P^3*C) tokens, got shape {tuple(tokens.shape)}.")
    c, h, w, d = shape
    p = int(patch_size)
    if p < 1 or h % p or w % p or d % p:
        raise ValueError(f"unpatchify: spatial size {(h, w, d)} is not divisible by patch_size {patch_size}.")
    gh, gw, gd = h // p, w // p, d // p
    b, n, f = tokens.shape
    if n != gh * gw * gd or f != p**3 * c:
        raise ValueError(
            f"unpatchify: tokens {tuple(tokens.shape)} do not match shape {shape} with patch {p} "
            f"(expected N={gh * gw * gd}, features={p**3 * c})."
        )
    x = tokens.reshape(b, gh, gw, gd, p, p, p, c)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C, Gh, ph, Gw, pw, Gd, pd)
    return x.reshape(b, c, h, w, d)


def sincos_pos_embed_3d(embed_dim: int, grid_size: Sequence[int]) -> torch.Tensor:
    """Fixed 3D sine-cosine position embedding in the package's token order.

    The width is split in 6 equal parts: ``[sin h, cos h, sin w, cos w, sin d, cos d]``, each with
    frequencies ``1 / 10000^(k / (D/6))``, ``k = 0 .. D/6 - 1`` (the 2D MAE recipe extended to 3 axes).

    Returns:
        float32 ``(1, Gh*Gw*Gd, embed_dim)``.
    """
    if embed_dim % 6:
        raise ValueError(f"embed_dim must be divisible by 6 for a 3D sin-cos position embedding, got {embed_dim}.")
    gh, gw, gd = (int(g) for g in grid_size)
    part = embed_dim // 6
    omega = 1.0 / 10000 ** (torch.arange(part, dtype=torch.float64) / part)  # (D/6,)
    ih, iw, id_ = torch.meshgrid(
        torch.arange(gh, dtype=torch.float64),
        torch.arange(gw, dtype=torch.float64),
        torch.arange(gd, dtype=torch.float64),
        indexing="ij",
    )  # each (Gh, Gw, Gd); flattening in C order gives the token order (ih*Gw + iw)*Gd + id
    parts = []
    for pos in (ih, iw, id_):
        angle = pos.reshape(-1, 1) * omega.reshape(1, -1)  # (N, D/6)
        parts += [torch.sin(angle), torch.cos(angle)]
    return torch.cat(parts, dim=1).unsqueeze(0).float()  # (1, N, D)


# ----------------------------------------------------------------------------------------------------
# blocks
# ----------------------------------------------------------------------------------------------------
class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch of a sample with probability ``drop_prob``.

    Written here (rather than imported from timm) to keep dependencies small; survivors are scaled by
    ``1 / keep_prob`` so the expectation is unchanged and evaluation is the identity.
    """

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}.")
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, ...)
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        mask = x.new_empty(shape).bernoulli_(keep)  # one draw per sample
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Mlp(nn.Module):
    """Linear -> GELU -> Linear."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, dim) -> (B, L, dim)
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention`` (flash / memory-efficient
    kernels on GPU when available)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads}).")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, dim) -> (B, L, dim)
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, L, dim/heads)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, L, dim/heads)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + DropPath(Attn(LN(x)))``, then ``x + DropPath(MLP(LN(x)))``."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path: float = 0.0
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, dim) -> (B, L, dim)
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed3d(nn.Module):
    """Non-overlapping cubic patches -> tokens: ``Conv3d(k=P, s=P)`` then flatten in token order."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W, D) -> (B, N, embed_dim)
        return self.proj(x).flatten(2).transpose(1, 2)

    def embed_selected(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Tokens of the patches ``ids`` (``(B, K)`` token indices) only: ``forward(x)`` gathered at ``ids``,
        without embedding the patches that are dropped (a masked autoencoder keeps a quarter of them).

        The convolution with stride = kernel is a matrix product per patch: the kept patches, in
        :func:`patchify`'s voxel order ``(ph, pw, pd, C)``, laid out as the Conv3d weight ``(D, C, ph, pw, pd)``
        is (the same order when C = 1, as for CT). The weight is only flattened, so its gradient has the
        weight's own strides: a permuted weight gave a gradient whose strides DDP's buckets do not share
        ("Grad strides do not match bucket view strides" under torchrun, and a copy every step).
        """
        w = self.proj.weight
        d, c, p = w.shape[0], w.shape[1], w.shape[-1]
        patches = patchify(x, p)  # (B, N, P^3 C)
        patches = torch.gather(patches, 1, ids.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))  # (B, K, P^3 C)
        if c > 1:
            b, k = patches.shape[:2]
            patches = patches.reshape(b, k, p**3, c).transpose(2, 3).reshape(b, k, c * p**3)
        return F.linear(patches, w.reshape(d, -1), self.proj.bias)


def init_weights_mae(module: nn.Module) -> None:
    """MAE initialisation: xavier-uniform Linear weights, zero biases, LayerNorm ones/zeros."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        if module.weight is not None:
            nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


# ----------------------------------------------------------------------------------------------------
# the encoder
# ----------------------------------------------------------------------------------------------------
class ViTEncoder(nn.Module):
    """3D ViT encoder f_theta (no class token): patch embedding, position embedding, blocks, final norm.

    Args:
        img_size: ROI ``(H, W, D)`` (or one int); divisible by ``patch_size`` in every axis.
        patch_size: cubic patch edge P.
        in_chans: input channels C.
        embed_dim: width; divisible by ``num_heads`` and, for sin-cos, by 6.
        depth: number of blocks.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / embed_dim.
        qkv_bias: bias in the qkv projection.
        drop_path_rate: stochastic depth of the last block; rises linearly from 0 over the blocks.
        pos_embed: ``"sincos"`` (fixed 3D sin-cos, not trained; pre-training) or ``"learnable"`` (starts
            from the same sin-cos values, trained; fine-tuning).
        grad_checkpointing: recompute block activations in backward (saves memory while training).
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = (96, 96, 96),
        patch_size: int = 16,
        in_chans: int = 1,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        pos_embed: str = "sincos",
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        img_size = _as_triple(img_size, "img_size")
        try:
            p = operator.index(patch_size)  # accepts numpy ints, refuses 16.0 and "16"
        except TypeError:
            p = 0
        if p < 1:
            raise ValueError(f"patch_size must be a positive int, got {patch_size!r}.")
        patch_size = p
        if any(s % patch_size for s in img_size):
            raise ValueError(f"img_size {img_size} must be divisible by patch_size {patch_size} in every axis.")
        if in_chans < 1:
            raise ValueError(f"in_chans must be at least 1, got {in_chans}.")
        if embed_dim < 1 or num_heads < 1 or depth < 1:
            raise ValueError(
                f"embed_dim, depth and num_heads must be positive, got embed_dim={embed_dim}, "
                f"depth={depth}, num_heads={num_heads}."
            )
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads}).")
        if pos_embed not in ("sincos", "learnable"):
            raise ValueError(f"pos_embed must be 'sincos' or 'learnable', got {pos_embed!r}.")
        if embed_dim % 6:
            # the learnable embedding starts from sin-cos too, so the constraint holds for both modes
            raise ValueError(
                f"embed_dim ({embed_dim}) must be divisible by 6 for the 3D sin-cos position embedding "
                "(sin and cos of each of the h, w, d axes)."
            )
        if mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {mlp_ratio}.")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}.")

        self._img_size = img_size
        self._patch_size = patch_size
        self._in_chans = int(in_chans)
        self._embed_dim = int(embed_dim)
        self._depth = int(depth)
        self._num_heads = int(num_heads)
        self._mlp_ratio = float(mlp_ratio)
        self._qkv_bias = bool(qkv_bias)
        self._drop_path_rate = float(drop_path_rate)
        self._pos_embed_mode = pos_embed
        self.grad_checkpointing = bool(grad_checkpointing)

        self.patch_embed = PatchEmbed3d(patch_size, in_chans, embed_dim)
        self.pos_embed = nn.Parameter(
            sincos_pos_embed_3d(embed_dim, self.grid_size), requires_grad=(pos_embed == "learnable")
        )  # (1, N, D)
        # deeper blocks are dropped more often; plain Python so that building on the meta device works
        rates = [drop_path_rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, drop_path=r) for r in rates
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self._init_weights()

    def _init_weights(self) -> None:
        # the patch projection is a Linear over flattened patches, so it is initialised like one
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        assert self.patch_embed.proj.bias is not None  # a Conv3d with a bias (PatchEmbed3d)
        nn.init.zeros_(self.patch_embed.proj.bias)
        self.blocks.apply(init_weights_mae)
        init_weights_mae(self.norm)

    # -- read-only description ---------------------------------------------------------------------
    @property
    def img_size(self) -> tuple[int, int, int]:
        return self._img_size

    @property
    def patch_size(self) -> int:
        return self._patch_size

    @property
    def in_chans(self) -> int:
        return self._in_chans

    @property
    def grid_size(self) -> tuple[int, int, int]:
        """Token grid ``(Gh, Gw, Gd)``."""
        return tuple(s // self._patch_size for s in self._img_size)  # type: ignore[return-value]

    @property
    def num_patches(self) -> int:
        return math.prod(self.grid_size)

    @property
    def embed_dim(self) -> int:
        return self._embed_dim

    @property
    def depth(self) -> int:
        return self._depth

    @property
    def num_heads(self) -> int:
        return self._num_heads

    def config(self) -> dict:
        """Constructor arguments as a JSON-serialisable dict: ``ViTEncoder(**enc.config())`` rebuilds it."""
        return {
            "img_size": list(self._img_size),
            "patch_size": self._patch_size,
            "in_chans": self._in_chans,
            "embed_dim": self._embed_dim,
            "depth": self._depth,
            "num_heads": self._num_heads,
            "mlp_ratio": self._mlp_ratio,
            "qkv_bias": self._qkv_bias,
            "drop_path_rate": self._drop_path_rate,
            "pos_embed": self._pos_embed_mode,
            "grad_checkpointing": self.grad_checkpointing,
        }

    # -- fine-tuning helpers -----------------------------------------------------------------------
    def set_pos_embed_learnable(self, flag: bool) -> None:
        """Train (``True``) or freeze (``False``) the position embedding; its current values are kept
        (fine-tuning starts the learnable embedding from the pre-trained sin-cos)."""
        self.pos_embed.requires_grad_(bool(flag))
        self._pos_embed_mode = "learnable" if flag else "sincos"

    @torch.no_grad()
    def resize_pos_embed(self, img_size: int | Sequence[int]) -> None:
        """Adapt the position embedding to a new ROI by trilinear interpolation of its token grid.

        Updates ``img_size`` / ``grid_size``; keeps the embedding's trainability. A no-op when the grid
        does not change.
        """
        new_size = _as_triple(img_size, "img_size")
        if any(s % self._patch_size for s in new_size):
            raise ValueError(f"img_size {new_size} must be divisible by patch_size {self._patch_size} in every axis.")
        new_grid = tuple(s // self._patch_size for s in new_size)
        if new_grid != self.grid_size:
            gh, gw, gd = self.grid_size
            pe = self.pos_embed.data.reshape(1, gh, gw, gd, self._embed_dim).permute(0, 4, 1, 2, 3)
            pe = F.interpolate(pe.float(), size=new_grid, mode="trilinear", align_corners=False)
            pe = pe.permute(0, 2, 3, 4, 1).reshape(1, -1, self._embed_dim).to(self.pos_embed.dtype)
            self.pos_embed = nn.Parameter(pe, requires_grad=self.pos_embed.requires_grad)
        self._img_size = new_size

    # -- forward -------------------------------------------------------------------------------------
    def forward(
        self, x: torch.Tensor, ids_keep: torch.Tensor | None = None, return_hidden: Iterable[int] = ()
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Encode a volume, optionally only a subset of its tokens.

        Args:
            x: ``(B, C, H, W, D)`` with ``(H, W, D) == img_size``.
            ids_keep: optional ``(B, K)`` long token indices to keep (the visible tokens). Only those
                patches are embedded, each with its own position embedding. ``(B, V, K)``: V views of
                each sample, each keeping its own K tokens, encoded as ``B * V`` sequences (sample-major:
                row ``b * V + v``) without copying the volume V times (the HPM teacher's masked views).
            return_hidden: 1-based block numbers whose outputs (before the final norm) are returned, in
                the order asked (UNETR uses ``(3, 6, 9)``).
        Returns:
            ``(tokens, hidden)``: tokens ``(B, N or K, D)`` (``(B * V, K, D)`` for views) after the final
            norm; hidden a list of the same shape.
        """
        if x.dim() != 5 or x.shape[1] != self._in_chans or tuple(x.shape[2:]) != self._img_size:
            raise ValueError(
                f"ViTEncoder expects input (B, {self._in_chans}, {', '.join(map(str, self._img_size))}), got "
                f"{tuple(x.shape)}; use resize_pos_embed() for another ROI."
            )
        wanted = [int(k) for k in return_hidden]
        bad = [k for k in wanted if not 1 <= k <= self._depth]
        if bad:
            raise ValueError(f"return_hidden block numbers must be in 1..{self._depth}, got {bad}.")

        if ids_keep is None:
            tokens = self.patch_embed(x) + self.pos_embed  # (B, N, D)
        else:
            if ids_keep.dim() not in (2, 3) or ids_keep.shape[0] != x.shape[0]:
                raise ValueError(
                    f"ids_keep must be (B, K) or (B, V, K) with B={x.shape[0]}, got {tuple(ids_keep.shape)}."
                )
            views = ids_keep.shape[1] if ids_keep.dim() == 3 else 1
            ids = ids_keep.long().reshape(x.shape[0], -1)  # (B, V*K): every view's patches of a sample
            # embed only the kept patches, each with its own position (the same tokens as embedding all
            # of them and gathering, for about a quarter of the embedding's work under a 75 % mask)
            pos = torch.gather(
                self.pos_embed.expand(x.shape[0], -1, -1), 1, ids.unsqueeze(-1).expand(-1, -1, self._embed_dim)
            )
            tokens = self.patch_embed.embed_selected(x, ids) + pos  # (B, V*K, D)
            if views > 1:
                tokens = tokens.reshape(x.shape[0] * views, -1, self._embed_dim)  # (B*V, K, D)

        outputs: dict[int, torch.Tensor] = {}
        use_ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for number, blk in enumerate(self.blocks, start=1):
            tokens = checkpoint(blk, tokens, use_reentrant=False) if use_ckpt else blk(tokens)
            if number in wanted:
                outputs[number] = tokens
        return self.norm(tokens), [outputs[k] for k in wanted]


# ----------------------------------------------------------------------------------------------------
# presets
# ----------------------------------------------------------------------------------------------------
# PRESETS (micro, tiny, small, base: width, depth, heads) is medhpm.config.ENCODER_PRESETS, the table the
# config validates model.preset against; it is imported at the top of this module.


def build_encoder(
    preset: str, img_size: int | Sequence[int], patch_size: int = 16, in_chans: int = 1, **overrides
) -> ViTEncoder:
    """Build a :class:`ViTEncoder` from a size preset (``micro``, ``tiny``, ``small``, ``base``); any
    constructor argument can be overridden by keyword."""
    if preset not in PRESETS:
        raise ValueError(f"Unknown encoder preset {preset!r}; choose one of: {', '.join(PRESETS)}.")
    kwargs = {**PRESETS[preset], **overrides}
    return ViTEncoder(img_size=img_size, patch_size=patch_size, in_chans=in_chans, **kwargs)
