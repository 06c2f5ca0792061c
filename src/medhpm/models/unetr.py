"""UNETR around the package's own 3D ViT encoder (fine-tuning stage, paper section 2).

The encoder is the SAME :class:`~medhpm.models.vit.ViTEncoder` class used in pre-training, so pre-trained
weights load by name (see :mod:`medhpm.models.transfer`). The convolutional decoder is built from MONAI's
UNETR blocks (``UnetrBasicBlock``, ``UnetrPrUpBlock``, ``UnetrUpBlock``, ``UnetOutBlock``) in the layout
of MONAI's ``networks/nets/unetr.py``; for patch 16 the decoder module names and shapes are exactly
MONAI's (``encoder1``..``encoder4``, ``decoder5``..``decoder2``, ``out``).

Resolution pyramid for patch ``P = 2^L`` (``L = 4`` for patch 16, ``L = 3`` for patch 8):

* level 0: the input image -> ``encoder1`` (``feature_size`` channels);
* levels 1 .. L-1: the outputs of the skip blocks (shallowest block -> level 1, the highest resolution),
  each a token grid ``(B, D, Gh, Gw, Gd)`` brought up to ``img / 2^k`` by a ``UnetrPrUpBlock`` with
  ``num_layer = L - 1 - k`` extra up-sampling layers (MONAI's 2, 1, 0 for patch 16), ``feature_size * 2^k``
  channels;
* level L: the final tokens after the encoder's norm (the token grid itself).

The decoder climbs back from level L to level 0 with one ``UnetrUpBlock`` per level (x2 each), then a 1x1x1
output convolution. Hence a patch of ``P`` needs exactly ``log2(P) - 1`` skip blocks: 3 for patch 16 (the
paper's blocks 3, 6, 9), 2 for patch 8.

Note: MONAI's own UNETR reads ``hidden_states_out[3], [6], [9]``, i.e. (1-based) blocks 4, 7 and 10; this
class takes the 1-based block numbers it is given, (3, 6, 9) by default as in the paper (docs/method.md, "Transfer to UNETR").
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any

import torch
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock
from torch import nn

from medhpm.models.vit import ViTEncoder

__all__ = ["UNETR", "build_unetr", "default_skip_blocks", "SUPPORTED_PATCH_SIZES"]

# The layout generalises to any power of two (log2(P) decoder stages), but only the two sizes the package
# trains with (16: the paper; 8: small CPU demos) are accepted, so untested decoders are never built.
SUPPORTED_PATCH_SIZES = (8, 16)


def default_skip_blocks(depth: int, patch_size: int) -> tuple[int, ...]:
    """Evenly spaced 1-based skip blocks: ``(3, 6, 9)`` for 12 blocks and patch 16, ``(4, 8)`` for patch 8.

    ``log2(patch_size) - 1`` blocks at ``round(depth * k / (n + 1))``, k = 1..n.
    """
    n = int(math.log2(patch_size)) - 1
    return tuple(max(1, round(depth * k / (n + 1))) for k in range(1, n + 1))


def _check_arguments(encoder, out_channels, feature_size) -> None:
    if not isinstance(encoder, ViTEncoder):
        raise ValueError(f"UNETR needs a medhpm ViTEncoder as its encoder, got {type(encoder).__name__}.")
    patch = encoder.patch_size
    if patch not in SUPPORTED_PATCH_SIZES:
        raise ValueError(
            f"UNETR supports patch sizes {SUPPORTED_PATCH_SIZES} (one x2 decoder stage per factor of 2), "
            f"but the encoder uses patch {patch}."
        )
    if isinstance(out_channels, bool) or not isinstance(out_channels, int) or out_channels < 1:
        raise ValueError(f"out_channels must be a positive int (number of classes), got {out_channels!r}.")
    if isinstance(feature_size, bool) or not isinstance(feature_size, int) or feature_size < 1:
        raise ValueError(f"feature_size must be a positive int, got {feature_size!r}.")


def _resolve_skip_blocks(encoder: ViTEncoder, skip_blocks: Sequence[int] | None, n_levels: int) -> tuple[int, ...]:
    """The 1-based skip blocks (default :func:`default_skip_blocks`), checked: one per intermediate level,
    within the depth, increasing."""
    patch = encoder.patch_size
    if skip_blocks is None:
        skip_blocks = default_skip_blocks(encoder.depth, patch)
    skip_blocks = tuple(int(b) for b in skip_blocks)
    if len(skip_blocks) != n_levels - 1:
        raise ValueError(
            f"With patch {patch} UNETR needs exactly {n_levels - 1} skip blocks (one per intermediate "
            f"resolution), got {len(skip_blocks)}: {skip_blocks}. "
            f"For this encoder try {default_skip_blocks(encoder.depth, patch)}."
        )
    bad = [b for b in skip_blocks if not 1 <= b <= encoder.depth]
    if bad:
        raise ValueError(
            f"skip_blocks {skip_blocks} must be 1-based block numbers within the encoder depth "
            f"1..{encoder.depth}; out of range: {bad}."
        )
    if list(skip_blocks) != sorted(set(skip_blocks)):
        raise ValueError(
            f"skip_blocks must be distinct and increasing (shallow block -> high-resolution skip), got {skip_blocks}."
        )
    return skip_blocks


class UNETR(nn.Module):
    """UNETR (Hatamizadeh et al. 2022) whose transformer is a :class:`ViTEncoder`.

    Args:
        encoder: the ViT encoder (built with the fine-tuning drop path, e.g. ``drop_path_rate=0.1``). Its
            position embedding is made learnable here: a fixed sin-cos one becomes the initial value.
        out_channels: number of output classes (background included), at least 1.
        feature_size: base width of the convolutional decoder (MONAI's ``feature_size``), positive.
        skip_blocks: 1-based encoder blocks whose outputs feed the skip connections, shallow to deep;
            ``log2(patch) - 1`` of them (3 for patch 16, 2 for patch 8). ``None`` picks
            :func:`default_skip_blocks` (``(3, 6, 9)`` for a 12-block encoder with patch 16).
        norm_name: MONAI norm of the decoder blocks (``"instance"``, ``"batch"``, ...).
        res_block: residual convolution blocks (MONAI default True).
        conv_block: convolutions between the up-samplings of the skip paths (MONAI default True).

    Input ``(B, C_in, H, W, D)`` with ``(H, W, D) == encoder.img_size``; output logits
    ``(B, out_channels, H, W, D)``.
    """

    def __init__(
        self,
        encoder: ViTEncoder,
        out_channels: int,
        feature_size: int = 16,
        skip_blocks: Sequence[int] | None = None,
        norm_name: tuple | str = "instance",
        res_block: bool = True,
        conv_block: bool = True,
    ) -> None:
        super().__init__()
        _check_arguments(encoder, out_channels, feature_size)
        n_levels = int(math.log2(encoder.patch_size))  # decoder stages; the token grid sits at level n_levels
        skip_blocks = _resolve_skip_blocks(encoder, skip_blocks, n_levels)  # checked before the encoder changes
        self.encoder = encoder
        # fine-tuning trains the position embedding; the pre-trained (or sin-cos) values are the start
        self.encoder.set_pos_embed_learnable(True)
        self.out_channels = out_channels
        self.feature_size = feature_size
        self.skip_blocks = skip_blocks
        self.n_levels = n_levels
        blocks: dict[str, Any] = dict(norm_name=norm_name, res_block=res_block)
        # level 0: convolutions on the raw image
        self.encoder1 = UnetrBasicBlock(
            spatial_dims=3, in_channels=encoder.in_chans, out_channels=feature_size, kernel_size=3, stride=1, **blocks
        )
        self._skip_names = self._add_skip_paths(encoder.embed_dim, conv_block, blocks)
        self._decoder_names = self._add_decoder(encoder.embed_dim, blocks)
        self.out = UnetOutBlock(spatial_dims=3, in_channels=feature_size, out_channels=out_channels)

    def _add_skip_paths(self, hidden: int, conv_block: bool, blocks: dict) -> list[str]:
        """Levels 1..L-1: token grids up-sampled by 2^(L-k); named encoder2.. as in MONAI."""
        names = []
        for k in range(1, self.n_levels):
            name = f"encoder{k + 1}"
            self.add_module(
                name,
                UnetrPrUpBlock(
                    spatial_dims=3,
                    in_channels=hidden,
                    out_channels=self.feature_size * 2**k,
                    num_layer=self.n_levels - 1 - k,
                    kernel_size=3,
                    stride=1,
                    upsample_kernel_size=2,
                    conv_block=conv_block,
                    **blocks,
                ),
            )
            names.append(name)
        return names

    def _add_decoder(self, hidden: int, blocks: dict) -> list[str]:
        """decoder{k+2} produces level k from level k+1 (MONAI's decoder5..decoder2 for patch 16)."""
        names = []
        for k in range(self.n_levels - 1, -1, -1):
            name = f"decoder{k + 2}"
            in_ch = hidden if k == self.n_levels - 1 else self.feature_size * 2 ** (k + 1)
            self.add_module(
                name,
                UnetrUpBlock(
                    spatial_dims=3,
                    in_channels=in_ch,
                    out_channels=self.feature_size * 2**k,
                    kernel_size=3,
                    upsample_kernel_size=2,
                    **blocks,
                ),
            )
            names.append(name)
        return names

    # -- helpers --------------------------------------------------------------------------------------
    def tokens_to_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, N, D)`` tokens in the package's token order -> ``(B, D, Gh, Gw, Gd)``."""
        b, n, d = tokens.shape
        gh, gw, gd = self.encoder.grid_size
        # token index (ih*Gw + iw)*Gd + id is C order over (Gh, Gw, Gd): a plain reshape restores the grid
        return tokens.transpose(1, 2).reshape(b, d, gh, gw, gd)

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's state dict (keys as in :class:`ViTEncoder`, no prefix), e.g. for export."""
        return self.encoder.state_dict()

    # -- forward --------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, H, W, D)`` -> logits ``(B, out_channels, H, W, D)``."""
        tokens, hidden = self.encoder(x, return_hidden=self.skip_blocks)  # (B, N, D), list of (B, N, D)
        skips = [self.encoder1(x)]  # level 0: (B, F, H, W, D)
        for name, h in zip(self._skip_names, hidden, strict=True):
            skips.append(getattr(self, name)(self.tokens_to_grid(h)))  # level k: (B, F*2^k, H/2^k, ...)
        y = self.tokens_to_grid(tokens)  # level L: (B, D, Gh, Gw, Gd)
        for name, skip in zip(self._decoder_names, reversed(skips), strict=True):
            y = getattr(self, name)(y, skip)  # up x2, concatenate the skip, convolve
        return self.out(y)


def build_unetr(
    encoder_args: dict,
    out_channels: int,
    feature_size: int = 16,
    drop_path: float = 0.1,
    skip_blocks: Sequence[int] | None = None,
    norm_name: tuple | str = "instance",
    img_size: int | Sequence[int] | None = None,
    res_block: bool = True,
    conv_block: bool = True,
) -> UNETR:
    """Build a UNETR whose encoder matches a pre-trained one.

    Args:
        encoder_args: ``ViTEncoder.config()`` of the pre-trained encoder (from the checkpoint's
            ``model_args["encoder"]`` or the sidecar's ``encoder_args``); its ``img_size`` is the
            pre-training ROI.
        out_channels, feature_size, skip_blocks, norm_name, res_block, conv_block: see :class:`UNETR`.
        drop_path: stochastic depth of the deepest block for fine-tuning (replaces the pre-training value).
        img_size: fine-tuning ROI; when it differs from the pre-training ROI the position embedding grid
            is interpolated (``ViTEncoder.resize_pos_embed``). ``None`` keeps the pre-training ROI.
    Returns:
        A :class:`UNETR` with a learnable position embedding and freshly initialised weights; load the
        pre-trained weights with :func:`medhpm.runtime.weights.load_encoder_weights` (which interpolates
        a pre-training position embedding to this grid too).
    """
    accepted = set(inspect.signature(ViTEncoder.__init__).parameters) - {"self"}
    unknown = sorted(set(encoder_args) - accepted)
    if unknown:
        raise ValueError(
            f"encoder_args has keys that ViTEncoder does not take: {unknown}; expected a subset of {sorted(accepted)}."
        )
    args = dict(encoder_args)
    args["drop_path_rate"] = float(drop_path)
    args["pos_embed"] = "learnable"  # starts from the same sin-cos values; trained while fine-tuning
    encoder = ViTEncoder(**args)
    if img_size is not None:
        encoder.resize_pos_embed(img_size)
    return UNETR(
        encoder,
        out_channels=out_channels,
        feature_size=feature_size,
        skip_blocks=skip_blocks,
        norm_name=norm_name,
        res_block=res_block,
        conv_block=conv_block,
    )
