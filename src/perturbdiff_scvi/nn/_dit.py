"""SetDiT: the two-stream set transformer that denoises a whole cell set (PerturbDiff's ``Cross_DiT``).

One token per cell, no positional encoding (so the network is permutation equivariant over cells).
Two streams, the noisy perturbed cells and the matched control cells, share one attention over
feature-concatenated, index-paired tokens ``[h_i ; hc_i]``. Each stream has its own adaLN-Zero
modulation and MLP, in the parallel-residual form of the released code. Layout follows
facebookresearch/DiT ``models.py``: embedders, block, final layer, model, initialisation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._perturbation_encoder import FeatureEncoder


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation; ``shift``/``scale`` are per set ``(B, H)``, ``x`` is ``(B, S, H)``."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#                                   Embedders                                   #
#################################################################################


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of the raw integer timestep followed by an MLP (DiT)."""

    def __init__(self, n_hidden: int, n_frequencies: int = 256, max_period: float = 1e4):
        super().__init__()
        self.n_frequencies = n_frequencies
        self.max_period = max_period
        self.mlp = nn.Sequential(nn.Linear(n_frequencies, n_hidden), nn.SiLU(), nn.Linear(n_hidden, n_hidden))

    def sinusoid(self, t: torch.Tensor) -> torch.Tensor:
        half = self.n_frequencies // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, H)
        return self.mlp(self.sinusoid(t))


class CovariateEmbedder(nn.Module):
    """One-hot covariate branches (perturbation, context, batch) -> adaLN class embedding.

    Each branch is an ``nn.Embedding`` to ``n_cov`` dims; the three are concatenated, projected to
    ``n_cov_hidden`` (the released code uses the gene count here), then SiLU and a Linear to ``H``.
    ``drop`` replaces the whole embedding by a learned null embedding (classifier-free guidance).
    ``pert`` may also be ``(B, K)``: the codes of a combination's components (``-1`` = padding), whose
    embeddings are summed, so ``A+B`` is embedded as ``e_A + e_B`` and the control (no component) as 0.
    With ``perturbation_features`` (a ``(n_perturbations, F)`` table), the perturbation branch is a
    :class:`~perturbdiff_scvi.nn.FeatureEncoder` of those rows instead of a lookup table; codes index its rows.
    ``embed_context=False`` leaves the context out (its branch is zeros): the denoiser then knows the context
    only from the matched control cells.
    """

    def __init__(
        self,
        n_perturbations: int,
        n_contexts: int,
        n_batches: int,
        n_hidden: int,
        n_cov: int,
        n_cov_hidden: int,
        *,
        perturbation_features: torch.Tensor | None = None,
        embed_context: bool = True,
    ):
        super().__init__()
        if perturbation_features is None:
            self.perturbation = nn.Embedding(n_perturbations, n_cov)
        else:
            self.perturbation = FeatureEncoder(perturbation_features, n_cov)
        self.context = nn.Embedding(n_contexts, n_cov) if embed_context else None
        self.batch = nn.Embedding(n_batches, n_cov)
        self.project = nn.Linear(3 * n_cov, n_cov_hidden)
        self.to_hidden = nn.Sequential(nn.SiLU(), nn.Linear(n_cov_hidden, n_hidden))
        self.null = nn.Parameter(torch.zeros(n_hidden))

    def forward(
        self, pert: torch.Tensor, ctx: torch.Tensor, batch: torch.Tensor, drop: torch.Tensor | None = None
    ) -> torch.Tensor:  # codes (B,) -> (B, H)
        batch_emb = self.batch(batch)
        ctx_emb = self.context(ctx) if self.context is not None else torch.zeros_like(batch_emb)
        cov = torch.cat([self.embed_perturbation(pert), ctx_emb, batch_emb], dim=-1)
        emb = self.to_hidden(self.project(cov))
        if drop is not None:
            emb = torch.where(drop[:, None], self.null.expand_as(emb), emb)
        return emb

    def embed_perturbation(self, pert: torch.Tensor) -> torch.Tensor:  # (B,) or (B, K) -> (B, n_cov)
        if pert.dim() == 1:
            return self.perturbation(pert)
        present = (pert >= 0).unsqueeze(-1)
        return (self.perturbation(pert.clamp(min=0)) * present).sum(dim=1)


#################################################################################
#                                 Core blocks                                   #
#################################################################################


class JointSetAttention(nn.Module):
    """Multi-head self-attention over the S cell tokens of width ``2H`` with RMSNorm q/k-norm.

    ``out_dim`` (default ``dim``) is the width of the output projection.
    """

    def __init__(self, dim: int, n_heads: int, out_dim: int | None = None):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"2 * n_hidden ({dim}) must be divisible by n_heads ({n_heads}).")
        self.n_heads = n_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.q_norm = nn.RMSNorm(dim // n_heads, eps=1e-6)
        self.k_norm = nn.RMSNorm(dim // n_heads, eps=1e-6)
        # ``out_dim < dim`` keeps only the first ``out_dim`` output features (the cell stream of the last block).
        self.proj = nn.Linear(dim, out_dim or dim)

    def forward(self, u: torch.Tensor) -> torch.Tensor:  # (B, S, 2H) -> (B, S, out_dim)
        b, s, d = u.shape
        q, k, v = self.qkv(u).view(b, s, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        # q/k-norm in float32 (a no-op without mixed precision; under autocast it keeps the fused RMSNorm kernel)
        q, k = self.q_norm(q.float()).to(v.dtype), self.k_norm(k.float()).to(v.dtype)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, S, d_head)
        return self.proj(out.transpose(1, 2).reshape(b, s, d))


class Mlp(nn.Sequential):
    """H -> ratio*H -> H with tanh-GELU."""

    def __init__(self, dim: int, ratio: float):
        hidden = int(dim * ratio)
        super().__init__(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


class StreamModulation(nn.Module):
    """Per-stream adaLN-Zero: c -> (shift, scale, gate) for the attention and the MLP branch.

    The chunks come in the order ``shift_a, scale_a, gate_a, shift_m, scale_m, gate_m``; ``n_chunks=2`` keeps
    only the first two (the attention input modulation of a stream whose update is not used).
    """

    def __init__(self, n_hidden: int, n_chunks: int = 6):
        super().__init__()
        self.n_chunks = n_chunks
        self.linear = nn.Linear(n_hidden, n_chunks * n_hidden)

    def forward(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(F.silu(c)).chunk(self.n_chunks, dim=-1)


class JointDiTBlock(nn.Module):
    """MM-DiT block of the released model: two streams, one joint attention, parallel residuals.

    Both LayerNorms see the block input (parallel form); only the attention mixes cells.

    ``update_control=False`` builds the last block of :class:`SetDiT`, whose control-stream output is never
    used: the control stream still feeds the joint attention (its keys, values and queries), but its own
    update is skipped, so the block has no control MLP, its control modulation gives only the attention
    shift/scale, the attention projects to the cell stream only, and ``forward`` returns ``(h, None)``.
    These parameters would get no gradient (which multi-device DDP rejects) and never change the output.
    """

    def __init__(self, n_hidden: int, n_heads: int, mlp_ratio: float = 4.0, *, update_control: bool = True):
        super().__init__()
        self.n_hidden = n_hidden
        self.update_control = update_control
        self.norm1, self.norm2 = (
            nn.LayerNorm(n_hidden, elementwise_affine=False, eps=1e-6),
            nn.LayerNorm(n_hidden, elementwise_affine=False, eps=1e-6),
        )
        self.norm1_c = nn.LayerNorm(n_hidden, elementwise_affine=False, eps=1e-6)
        self.attn = JointSetAttention(2 * n_hidden, n_heads, out_dim=None if update_control else n_hidden)
        self.mlp = Mlp(n_hidden, mlp_ratio)
        self.ada = StreamModulation(n_hidden)
        if update_control:
            self.norm2_c = nn.LayerNorm(n_hidden, elementwise_affine=False, eps=1e-6)
            self.mlp_c = Mlp(n_hidden, mlp_ratio)
            self.ada_c = StreamModulation(n_hidden)
        else:
            self.ada_c = StreamModulation(n_hidden, n_chunks=2)

    def forward(self, h: torch.Tensor, hc: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.ada(c)
        cshift_a, cscale_a, *control_update = self.ada_c(c)
        a = modulate(self.norm1(h), shift_a, scale_a)  # (B, S, H)
        ac = modulate(self.norm1_c(hc), cshift_a, cscale_a)  # (B, S, H)
        m = self.mlp(modulate(self.norm2(h), shift_m, scale_m))  # MLP branch sees the block input
        update = self.attn(torch.cat([a, ac], dim=-1))  # (B, S, 2H), or (B, S, H) without the control update
        dh = update[..., : self.n_hidden]
        h = h + gate_a.unsqueeze(1) * dh + gate_m.unsqueeze(1) * m
        if not self.update_control:
            return h, None
        cgate_a, cshift_m, cscale_m, cgate_m = control_update
        mc = self.mlp_c(modulate(self.norm2_c(hc), cshift_m, cscale_m))
        dhc = update[..., self.n_hidden :]
        hc = hc + cgate_a.unsqueeze(1) * dhc + cgate_m.unsqueeze(1) * mc
        return h, hc


class FinalLayer(nn.Module):
    """LayerNorm + adaLN shift/scale + Linear(H -> G) + ReLU (predictions are non-negative log1p values)."""

    def __init__(self, n_hidden: int, n_genes: int, nonnegative: bool = True):
        super().__init__()
        self.norm = nn.LayerNorm(n_hidden, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Linear(n_hidden, 2 * n_hidden)
        self.linear = nn.Linear(n_hidden, n_genes)
        self.nonnegative = nonnegative  # False: raw output, for a caller that adds a skip term first

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:  # (B, S, H) -> (B, S, G)
        shift, scale = self.ada(F.silu(c)).chunk(2, dim=-1)
        out = self.linear(modulate(self.norm(h), shift, scale))
        return F.relu(out) if self.nonnegative else out


#################################################################################
#                                   SetDiT                                      #
#################################################################################


class SetDiT(nn.Module):
    """Denoiser over cell sets: predicts ``x0`` for all S perturbed cells jointly.

    Parameters
    ----------
    n_genes
        Genes per cell ``G`` (one token per cell).
    n_perturbations, n_contexts, n_batches
        Number of categories of each covariate (for combinatorial perturbations: of components).
    n_hidden
        Token width ``H`` (the joint attention runs at ``2H``).
    depth
        Number of :class:`JointDiTBlock`.
    n_heads
        Attention heads of the joint attention.
    mlp_ratio
        MLP expansion.
    n_cov
        Width of each covariate branch (128 in the released model).
    n_cov_hidden
        Width between the concatenated covariates and the class embedding; ``None`` uses ``n_genes``
        as the released code does.
    nonnegative
        ReLU on the output (``False`` for a caller that adds a skip term first).
    perturbation_features
        Optional ``(n_perturbations, F)`` feature table: the perturbation embedding is then computed from these
        rows (:class:`~perturbdiff_scvi.nn.FeatureEncoder`) instead of looked up.
    context_embedding
        Embed the context with the covariates (released); ``False``: the context reaches the denoiser only
        through its matched control cells.
    """

    def __init__(
        self,
        n_genes: int,
        n_perturbations: int,
        n_contexts: int,
        n_batches: int,
        *,
        n_hidden: int = 128,
        depth: int = 2,
        n_heads: int = 4,
        mlp_ratio: float = 4.0,
        n_cov: int = 64,
        n_cov_hidden: int | None = None,
        nonnegative: bool = True,
        perturbation_features: torch.Tensor | None = None,
        context_embedding: bool = True,
    ):
        super().__init__()
        self.n_genes = n_genes
        self.x_embed = nn.Linear(2 * n_genes, n_hidden)  # [x_t ; self-conditioning estimate]
        # The released control embedder is Linear(2G -> H) on [x_ctrl ; 0]: identical to Linear(G -> H) on x_ctrl.
        self.ctrl_embed = nn.Linear(n_genes, n_hidden)
        self.null_gene_embedding = nn.Parameter(torch.zeros(n_hidden))
        self.t_embed = TimestepEmbedder(n_hidden)
        self.cov_embed = CovariateEmbedder(
            n_perturbations,
            n_contexts,
            n_batches,
            n_hidden,
            n_cov,
            n_cov_hidden or n_genes,
            perturbation_features=perturbation_features,
            embed_context=context_embedding,
        )
        # The control stream's output of the last block is never used: that block skips the control update.
        self.blocks = nn.ModuleList(
            [JointDiTBlock(n_hidden, n_heads, mlp_ratio, update_control=i < depth - 1) for i in range(depth)]
        )
        self.final = FinalLayer(n_hidden, n_genes, nonnegative)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Xavier for Linear layers, N(0, 0.02) timestep MLP, zeroed adaLN outputs (adaLN-Zero)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for block in self.blocks:
            if not block.update_control:  # the cell half of a 2H -> 2H projection: the same Xavier bound
                proj = block.attn.proj
                nn.init.xavier_uniform_(proj.weight, gain=math.sqrt(sum(proj.weight.shape) / (2 * proj.in_features)))
        for m in self.t_embed.mlp:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        for block in self.blocks:
            for ada in (block.ada.linear, block.ada_c.linear):
                nn.init.zeros_(ada.weight)
                nn.init.zeros_(ada.bias)
        # The output Linear is not zeroed: with x0-prediction behind a ReLU a zero layer has no gradient.
        nn.init.zeros_(self.final.ada.weight)
        nn.init.zeros_(self.final.ada.bias)

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        x_ctrl: torch.Tensor,
        pert: torch.Tensor,
        ctx: torch.Tensor,
        batch: torch.Tensor,
        self_cond: torch.Tensor | None = None,
        drop_cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict ``x0`` of shape ``(B, S, G)`` from ``x_t`` ``(B, S, G)`` and controls ``(B, S, G)``.

        ``t``, ``pert``, ``ctx``, ``batch`` are ``(B,)`` integer tensors (``pert`` may be ``(B, K)`` component
        codes, see :class:`CovariateEmbedder`); ``drop_cond`` ``(B,)`` bool replaces the covariates of those
        sets by the null embedding.
        """
        h, c = self.encode(x_t, t, x_ctrl, pert, ctx, batch, self_cond, drop_cond)
        return self.final(h, c)  # (B, S, G), >= 0

    def encode(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        x_ctrl: torch.Tensor,
        pert: torch.Tensor,
        ctx: torch.Tensor,
        batch: torch.Tensor,
        self_cond: torch.Tensor | None = None,
        drop_cond: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The cell tokens after the last block ``(B, S, H)`` and the class embedding ``(B, H)``.

        Same arguments as :meth:`forward`, which applies the final layer to them.
        """
        if self_cond is None:  # [x_t ; 0] @ W.T == x_t @ W[:, :G].T: skip the zero half (no concat, half the FLOPs)
            h = F.linear(x_t, self.x_embed.weight[:, : self.n_genes], self.x_embed.bias)
        else:
            h = self.x_embed(torch.cat([x_t, self_cond], dim=-1))
        h = h + self.null_gene_embedding  # (B, S, H)
        hc = self.ctrl_embed(x_ctrl) + self.null_gene_embedding  # (B, S, H)
        c = self.t_embed(t) + self.cov_embed(pert, ctx, batch, drop_cond)  # (B, H)
        for block in self.blocks:
            h, hc = block(h, hc, c)
        return h, c
