"""The selfMedHPM pre-training model (beside its losses: it is pre-training, not a backbone): encoder f_theta + image reconstructor d_phi + difficulty predictor d_psi.

Reads like the paper's Fig. 1 (one student; the teacher is an EMA copy of this whole module, see
``medhpm.pretrain.ema``)::

    x (B,C,H,W,D) --patchify--> (B,N,P^3C)                                     targets
    mask (B,N) True=masked --> ids_keep (B,K), ids_masked (B,M)  [ascending token index]
    forward_encoder:    visible tokens only                                    latent (B,K,D)
    decoder_input:      decoder_embed; visible tokens + mask tokens at their
                        positions; + decoder pos-embed                         seq (B,N,Dd)
    forward_decoder:    d_phi blocks -> norm -> pred head -> masked only       pred (B,M,P^3C)
    forward_predictor:  d_psi blocks (own pass over the same seq) -> norm
                        -> Linear(Dd, P^3C) -> mean over last axis             lp (B,M)
    reconstruction_loss (per-patch normalised MSE)                             per_patch (B,M), L_rec
    prediction_loss (eq. 1 ranking, or the absolute variant)                   L_pred
    predict_difficulty: teacher pass on the FULL volume, predictor only         s (B,N)
    predict_difficulty_views: teacher pass on V complementary MASKED views
                        (B*V sequences), mean over the views that mask a token  s (B,N)

Token order of every output over masked patches (``pred``, ``per_patch_loss``, ``lp``, targets): the
masked tokens in ASCENDING token index, i.e. ``ids_masked[b]`` is sorted and ``pred[b, i]`` belongs to
token ``ids_masked[b, i]`` (token index ``(ih*Gw + iw)*Gd + id``, see ``vit.py``).

The encoder is a plain :class:`~medhpm.models.vit.ViTEncoder`; everything about pre-training lives here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medhpm.models.vit import Block, ViTEncoder, init_weights_mae, patchify, sincos_pos_embed_3d, unpatchify
from medhpm.pretrain.losses import absolute_loss, normalize_patches, ranking_loss, reconstruction_loss

__all__ = ["HPMPretrainModel", "mask_to_ids"]

_PREDICTION_LOSSES = ("ranking", "absolute")


def mask_to_ids(mask: torch.Tensor, num_masked: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a mask into kept and masked token indices, each in ascending token index.

    Args:
        mask: bool ``(B, N)``, True = masked, the same count ``M`` (0 < M < N) in every sample.
        num_masked: ``M`` when the caller knows it (the trainer: ``masking.num_masked(N, mask_ratio)``,
            which every mask of ``random_mask``/``hard_patch_mask`` has by construction). Then nothing is
            read back from the device; without it, M is counted (one host sync) and checked.
    Returns:
        ``(ids_keep (B, K), ids_masked (B, M))``, long.
    """
    if mask.dim() != 2 or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool (B, N) tensor, got {mask.dtype} {tuple(mask.shape)}.")
    b, n = mask.shape
    if num_masked is not None:
        lo = int(num_masked)
        if not 0 < lo < n:
            raise ValueError(f"num_masked must be at least one and at most N-1={n - 1} tokens, got {lo}.")
    else:
        counts = mask.sum(dim=1)
        lo, hi = torch.stack([counts.min(), counts.max()]).tolist()  # one host sync: M sizes the outputs
        if lo != hi:
            raise ValueError(f"every sample must mask the same number of tokens, got between {lo} and {hi}.")
        if not 0 < lo < n:
            raise ValueError(f"the mask must hide at least one and at most N-1={n - 1} tokens, got {lo}.")
    index = torch.arange(n, device=mask.device).expand(b, n)
    # masked tokens sort first, each group in ascending index (keys are unique, so no stable sort needed)
    order = torch.argsort(torch.where(mask, index, index + n), dim=1)  # (B, N)
    return order[:, lo:], order[:, :lo]


def _gather_tokens(seq: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``seq`` (B, N, F), ``ids`` (B, L) -> (B, L, F)."""
    return torch.gather(seq, 1, ids.unsqueeze(-1).expand(-1, -1, seq.shape[-1]))


class HPMPretrainModel(nn.Module):
    """Student of selfMedHPM (and, with ``predictor=False``, the plain MAE of SelfMedMAE).

    Args:
        encoder: the ViT to pre-train (its weights are not re-initialised here).
        decoder_dim: width Dd of both decoders (divisible by 6 for the sin-cos embedding and by
            ``decoder_heads``).
        decoder_depth: blocks of the reconstructor, and of the predictor.
        decoder_heads: attention heads of both decoders.
        predictor: build the difficulty (loss) predictor d_psi; ``False`` gives a plain MAE.
        norm_pix_loss: reconstruct per-patch normalised voxels (paper 2.1).
        prediction_loss: ``"ranking"`` (eq. 1) or ``"absolute"`` (HPM's ``relative=False``).
        mlp_ratio: MLP width ratio of the decoder blocks.
    """

    def __init__(
        self,
        encoder: ViTEncoder,
        decoder_dim: int = 384,
        decoder_depth: int = 8,
        decoder_heads: int = 12,
        predictor: bool = True,
        norm_pix_loss: bool = True,
        prediction_loss: str = "ranking",
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        if not isinstance(encoder, ViTEncoder):
            raise ValueError(f"encoder must be a medhpm ViTEncoder, got {type(encoder).__name__}.")
        if decoder_dim < 1 or decoder_depth < 1 or decoder_heads < 1:
            raise ValueError(
                f"decoder_dim, decoder_depth and decoder_heads must be positive, got {decoder_dim}, "
                f"{decoder_depth}, {decoder_heads}."
            )
        if decoder_dim % decoder_heads:
            raise ValueError(f"decoder_dim ({decoder_dim}) must be divisible by decoder_heads ({decoder_heads}).")
        if decoder_dim % 6:
            raise ValueError(
                f"decoder_dim ({decoder_dim}) must be divisible by 6 for the decoder's 3D sin-cos position embedding."
            )
        if prediction_loss not in _PREDICTION_LOSSES:
            raise ValueError(f"prediction_loss must be one of {_PREDICTION_LOSSES}, got {prediction_loss!r}.")

        self.encoder = encoder
        self.patch_size = encoder.patch_size
        self.in_chans = encoder.in_chans
        self.norm_pix_loss = bool(norm_pix_loss)
        self.prediction_loss_kind = prediction_loss
        self._config = dict(
            decoder_dim=int(decoder_dim),
            decoder_depth=int(decoder_depth),
            decoder_heads=int(decoder_heads),
            predictor=bool(predictor),
            norm_pix_loss=bool(norm_pix_loss),
            prediction_loss=prediction_loss,
            mlp_ratio=float(mlp_ratio),
        )
        patch_dim = self.patch_size**3 * self.in_chans  # P^3 * C

        # shared by reconstructor and predictor: projection, mask token, decoder position embedding
        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(
            sincos_pos_embed_3d(decoder_dim, encoder.grid_size), requires_grad=False
        )  # (1, N, Dd), fixed

        # image reconstructor d_phi
        self.decoder_blocks = nn.ModuleList(Block(decoder_dim, decoder_heads, mlp_ratio) for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, patch_dim)

        # difficulty predictor d_psi: same shape; its head is Linear to P^3*C then a mean (not Linear to 1),
        # which is how HPM initialises it (docs/method.md, "Traps we guard against")
        self.has_predictor = bool(predictor)
        if self.has_predictor:
            self.predictor_blocks = nn.ModuleList(
                Block(decoder_dim, decoder_heads, mlp_ratio) for _ in range(decoder_depth)
            )
            self.predictor_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
            self.predictor_pred = nn.Linear(decoder_dim, patch_dim)
        else:  # None without a predictor: forward_predictor, their one use, checks has_predictor first
            self.predictor_blocks = None  # type: ignore[assignment]
            self.predictor_norm = None  # type: ignore[assignment]
            self.predictor_pred = None  # type: ignore[assignment]

        self._init_decoders()

    def _init_decoders(self) -> None:
        # only the new parts: the encoder may already hold pre-trained weights
        nn.init.normal_(self.mask_token, std=0.02)
        for name, module in self.named_children():
            if name != "encoder" and module is not None:
                module.apply(init_weights_mae)

    def config(self) -> dict:
        """JSON-serialisable arguments: ``{"encoder": encoder.config(), **decoder args}``."""
        return {"encoder": self.encoder.config(), **self._config}

    @classmethod
    def from_config(cls, config: dict) -> HPMPretrainModel:
        """Rebuild from :meth:`config` (weights not included)."""
        config = dict(config)
        encoder = ViTEncoder(**config.pop("encoder"))
        return cls(encoder, **config)

    # -- 1. patchify / mask ------------------------------------------------------------------------
    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W, D) -> (B, N, P^3*C)`` in token order."""
        return patchify(x, self.patch_size)

    def unpatchify(self, tokens: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        """``(B, N, P^3*C) -> (B, C, H, W, D)``; ``shape`` is ``(C, H, W, D)`` or ``(B, C, H, W, D)``."""
        return unpatchify(tokens, self.patch_size, shape)

    # -- 2. encoder f_theta on visible tokens --------------------------------------------------------
    def forward_encoder(self, x: torch.Tensor, ids_keep: torch.Tensor | None) -> torch.Tensor:
        """``x`` (B, C, H, W, D), ``ids_keep`` (B, K) or None (all tokens) -> latent (B, K or N, D)."""
        latent, _ = self.encoder(x, ids_keep=ids_keep)
        return latent

    # -- 3. the decoder input sequence shared by d_phi and d_psi ------------------------------------
    def decoder_input(self, latent: torch.Tensor, ids_keep: torch.Tensor | None) -> torch.Tensor:
        """Project visible tokens, put them at their positions among mask tokens, add position.

        Args:
            latent: ``(B, K, D)`` encoder output for ``ids_keep``; or ``(B, N, D)`` with ``ids_keep=None``
                (nothing masked).
            ids_keep: ``(B, K)`` token indices of ``latent``'s rows, or None.
        Returns:
            ``(B, N, Dd)`` in token order.
        """
        vis = self.decoder_embed(latent)  # (B, K, Dd)
        if ids_keep is not None:
            b, n = vis.shape[0], self.decoder_pos_embed.shape[1]
            seq = self.mask_token.to(vis.dtype).expand(b, n, -1)  # (B, N, Dd)
            # out-of-place scatter: gradients reach both the visible tokens and the mask token
            vis = torch.scatter(seq, 1, ids_keep.unsqueeze(-1).expand(-1, -1, vis.shape[-1]), vis)
        return vis + self.decoder_pos_embed  # (B, N, Dd)

    # -- 4. image reconstructor d_phi ----------------------------------------------------------------
    def forward_decoder(self, seq: torch.Tensor, ids_masked: torch.Tensor | None) -> torch.Tensor:
        """``seq`` (B, N, Dd) -> ``pred`` (B, M, P^3*C) at ``ids_masked`` (B, M); all N if it is None."""
        for blk in self.decoder_blocks:
            seq = blk(seq)
        if ids_masked is not None:
            seq = _gather_tokens(seq, ids_masked)  # (B, M, Dd)
        return self.decoder_pred(self.decoder_norm(seq))  # (B, M, P^3*C)

    # -- 5. difficulty predictor d_psi ---------------------------------------------------------------
    def forward_predictor(self, seq: torch.Tensor, ids_masked: torch.Tensor | None) -> torch.Tensor:
        """``seq`` (B, N, Dd) -> predicted loss ``lp`` (B, M) at ``ids_masked`` (B, M); (B, N) if None.

        Runs its own blocks over the decoder input sequence (not over the reconstructor's features).
        """
        if not self.has_predictor:
            raise RuntimeError("this HPMPretrainModel was built with predictor=False; it has no loss predictor.")
        for blk in self.predictor_blocks:
            seq = blk(seq)
        if ids_masked is not None:
            seq = _gather_tokens(seq, ids_masked)  # (B, M, Dd)
        return self.predictor_pred(self.predictor_norm(seq)).mean(dim=-1)  # (B, M)

    @torch.no_grad()
    def predict_difficulty(self, x: torch.Tensor) -> torch.Tensor:
        """Teacher step: predicted per-patch loss of the whole volume, nothing masked.

        Encoder on all N tokens, projection, position, predictor; the reconstructor is not run.
        ``x`` (B, C, H, W, D) -> ``(B, N)`` in token order.

        Always computed in float32, also under a bf16 autocast: bf16 scores of a 216-token crop take only
        about 180 distinct values, and ``topk`` would then choose among tied patches arbitrarily.
        """
        with torch.autocast(device_type=x.device.type, enabled=False):
            latent = self.forward_encoder(x.float(), None)  # (B, N, D)
            seq = self.decoder_input(latent, None)  # (B, N, Dd)
            return self.forward_predictor(seq, None).float()  # (B, N)

    @torch.no_grad()
    def predict_difficulty_views(self, x: torch.Tensor, ids_visible: torch.Tensor) -> torch.Tensor:
        """Teacher step from masked views, like the inputs the predictor is trained on.

        ``ids_visible`` ``(B, V, K)``: the tokens each of V views of a sample keeps visible (disjoint
        groups, see ``medhpm.pretrain.step.view_partition``). All ``B * V`` views run as ONE batch: the
        encoder on each view's K visible tokens, the predictor over each view's whole sequence (visible
        tokens and mask tokens). A token's score is the mean of the predicted losses of the views that mask
        it. ``x`` (B, C, H, W, D) -> ``(B, N)`` float32 in token order, computed in float32 whatever the
        autocast (as :meth:`predict_difficulty`).
        """
        if ids_visible.dim() != 3 or ids_visible.shape[0] != x.shape[0]:
            raise ValueError(f"ids_visible must be (B, V, K) with B={x.shape[0]}, got {tuple(ids_visible.shape)}.")
        b, v, k = ids_visible.shape
        n = self.encoder.num_patches
        with torch.autocast(device_type=x.device.type, enabled=False):
            latent = self.forward_encoder(x.float(), ids_visible)  # (B*V, K, D)
            seq = self.decoder_input(latent, ids_visible.reshape(b * v, k))  # (B*V, N, Dd)
            lp = self.forward_predictor(seq, None).float().reshape(b, v, n)  # (B, V, N)
        masked = torch.ones(b, v, n, dtype=torch.bool, device=x.device).scatter(2, ids_visible, False)
        return torch.where(masked, lp, 0.0).sum(1) / masked.sum(1)  # (B, N)

    # -- 6. losses (float32 even under autocast) -----------------------------------------------------
    def reconstruction_loss(
        self, x: torch.Tensor, pred: torch.Tensor, ids_masked: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """L_rec: ``x`` (B, C, H, W, D), ``pred`` (B, M, P^3*C) at ``ids_masked`` (B, M)
        -> ``(scalar, per_patch (B, M))``, both float32."""
        target = _gather_tokens(self.patchify(x), ids_masked)  # (B, M, P^3*C)
        with torch.autocast(device_type=pred.device.type, enabled=False):
            return reconstruction_loss(pred.float(), target.float(), norm_pix_loss=self.norm_pix_loss)

    def prediction_loss(self, lp: torch.Tensor, per_patch_loss: torch.Tensor) -> torch.Tensor:
        """L_pred: ``lp`` (B, M) against the detached ``per_patch_loss`` (B, M), same token order."""
        fn = ranking_loss if self.prediction_loss_kind == "ranking" else absolute_loss
        with torch.autocast(device_type=lp.device.type, enabled=False):
            return fn(lp.float(), per_patch_loss.detach().float())

    # -- one student iteration ---------------------------------------------------------------------
    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, num_masked: int | None = None
    ) -> dict[str, torch.Tensor | None]:
        """Student forward for a given mask.

        Args:
            x: ``(B, C, H, W, D)``.
            mask: bool ``(B, N)``, True = masked, the same count M in every sample.
            num_masked: M, if known (no host sync; see :func:`mask_to_ids`).
        Returns:
            dict with (all masked-patch tensors in ascending token index, see ``ids_masked``):
              * ``loss_rec``: float32 scalar L_rec.
              * ``loss_pred``: float32 scalar L_pred (``None`` without predictor).
              * ``per_patch_loss``: ``(B, M)`` float32, with graph (detach it for logging or ranking).
              * ``lp``: ``(B, M)`` predicted losses, or ``None`` without predictor.
              * ``pred``: ``(B, M, P^3*C)`` reconstruction of the masked patches (normalised space if
                ``norm_pix_loss``).
              * ``ids_masked``: ``(B, M)``; ``ids_keep``: ``(B, K)``; ``mask``: the input mask.
        """
        ids_keep, ids_masked = mask_to_ids(mask, num_masked)  # (B, K), (B, M)
        latent = self.forward_encoder(x, ids_keep)  # (B, K, D)
        seq = self.decoder_input(latent, ids_keep)  # (B, N, Dd)
        pred = self.forward_decoder(seq, ids_masked)  # (B, M, P^3*C)
        loss_rec, per_patch = self.reconstruction_loss(x, pred, ids_masked)  # (), (B, M)
        lp = loss_pred = None
        if self.has_predictor:
            lp = self.forward_predictor(seq, ids_masked)  # (B, M)
            loss_pred = self.prediction_loss(lp, per_patch)
        return {
            "loss_rec": loss_rec,
            "loss_pred": loss_pred,
            "per_patch_loss": per_patch,
            "lp": lp,
            "pred": pred,
            "ids_masked": ids_masked,
            "ids_keep": ids_keep,
            "mask": mask,
        }

    # -- figures -------------------------------------------------------------------------------------
    @torch.no_grad()
    def reconstruct_full(self, x: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Reconstruct every patch (for figures), in token order.

        With ``norm_pix_loss`` the reconstructor predicts normalised patches; they are brought back to
        voxel values with each ORIGINAL patch's own mean and variance (as in MAE's figures: the
        statistics of masked patches come from the ground truth, so use this for display only).

        Returns dict:
            ``pred`` (B, N, P^3*C) raw reconstructor output; ``pred_voxels`` (B, N, P^3*C) de-normalised;
            ``recon`` (B, C, H, W, D) the de-normalised prediction everywhere; ``pasted`` (B, C, H, W, D)
            original visible patches with predicted masked patches; ``masked_input`` (B, C, H, W, D) the
            input with masked patches zeroed; ``mask`` (B, N).
        """
        ids_keep, _ = mask_to_ids(mask)
        seq = self.decoder_input(self.forward_encoder(x, ids_keep), ids_keep)  # (B, N, Dd)
        pred = self.forward_decoder(seq, None).float()  # (B, N, P^3*C)
        patches = self.patchify(x).float()  # (B, N, P^3*C)
        if self.norm_pix_loss:
            _, mean, var = normalize_patches(patches)  # (B, N, 1) each
            pred_voxels = pred * torch.sqrt(var + 1e-6) + mean
        else:
            pred_voxels = pred
        m = mask.unsqueeze(-1)  # (B, N, 1)
        shape = tuple(x.shape)
        return {
            "pred": pred,
            "pred_voxels": pred_voxels,
            "recon": self.unpatchify(pred_voxels, shape),
            "pasted": self.unpatchify(torch.where(m, pred_voxels, patches), shape),
            "masked_input": self.unpatchify(patches.masked_fill(m, 0.0), shape),
            "mask": mask,
        }
