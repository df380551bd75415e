"""Low-rank Adam/AdamW: Algorithm 2 of Schotthöfer, Klein, Kusch (2025)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .base import LowRankOptimizer
from .functional import adamw_device_update_, adamw_foreach_, adamw_update_

__all__ = ["LowRankAdam", "LR_SCALINGS", "NEW_MOMENTS", "COEFFICIENT_METRICS"]

LR_SCALINGS = ("dense", "lora", "none")
COEFFICIENT_METRICS = ("uniform", "balanced")
NEW_MOMENTS = ("zero", "second", "both", "project")


class LowRankAdam(LowRankOptimizer):
    r"""Geometric low-rank Adam with decoupled weight decay (Algorithm 2 of "A geometric
    framework for momentum-based optimizers for low-rank training", Schotthöfer, Klein,
    Kusch, 2025), rank-adaptive through the tolerance ``tau``.

    For every factorized layer (``W = U S Vᵀ``, first/second moments ``M``, ``Q`` of ``S``):

    .. code-block:: text

        G_K = ∇W V,  G_L = ∇Wᵀ U                              (U.grad, V.grad)
        Û = [U | orth((I − UUᵀ) G_K)],  V̂ = [V | orth((I − VVᵀ) G_L)]
        S̄, M̄, Q̄ = diag(S, 0), diag(M, 0), diag(Q, 0)
        G_S = Ûᵀ ∇W V̂                                           (mode: fused | two_pass | parallel)
        M̂ = β₁ M̄ + (1 − β₁) G_S,   Q̂ = β₂ Q̄ + (1 − β₂) G_S²
        Ŝ = S̄ − lr·wd·S̄ − c·lr · (M̂ / (1 − β₁ᵗ)) / (√(Q̂ / (1 − β₂ᵗ)) + ε)
                      c = √(n·m / (2r)²)   (lr_scaling="dense"),   c = 1   (lr_scaling="none": the paper)
        P Σ Rᵀ = svd(Ŝ);  r₁ = min{k : ‖σ_{k+1:}‖ ≤ τ ‖Ŝ‖_F}, clipped to [min_rank, max_rank]
        U, S, V ← Û P₁, Σ₁, V̂ R₁;   M ← P₁ᵀ M̂ R₁;   Q ← (P₁ᵀ √Q̂ R₁)²   (second_moment="paper")
                                                    Q ← (P₁∘P₁)ᵀ Q̂ (R₁∘R₁) (second_moment="squared")

    Every other trainable parameter of the model (biases, norms, layers left dense) gets
    the ``torch.optim.AdamW`` update with the same hyperparameters in the same ``step()``.

    Args:
        model: the model holding :class:`~lrc.LowRankLinear` / :class:`~lrc.LowRankConv2d` layers.
        lr (float): learning rate. Default: ``1e-3``.
        betas (tuple[float, float]): ``(β₁, β₂)``. Default: ``(0.9, 0.999)``.
        eps (float): added to the denominator. Default: ``1e-8``.
        weight_decay (float): decoupled weight decay, as AdamW. Default: ``0``.
        tau (float): truncation tolerance in ``[0, 1)``; ``0`` turns truncation off. Default: ``0.1``.
        min_rank (int): lowest rank a layer is truncated to. Default: ``1``.
        max_rank (int | None): highest rank a layer may grow to (``None``: the layer's own
            bound). Default: ``None``.
        mode (str): how ``G_S`` is obtained: ``"fused"`` (one forward/backward, exact; no
            gradient accumulation), ``"two_pass"`` (the paper as written, a second
            forward/backward through ``step(closure)``), ``"parallel"`` (one pass, the
            new-new block of ``G_S`` set to zero; accumulates). Default: ``"fused"``.
        new_block_fraction (float | None): how much of each batch forms the new-new block ``Ũᵀ∇W Ṽ`` of
            ``G_S`` — the one block that needs products of the batch's size (``g Ũ`` and ``x Ṽ``) beyond
            LoRA's four per layer. With a share ``f < 1`` it is estimated from the batch's first ``⌈f·B⌉``
            rows (a shuffling data loader makes them a random sample), centered on the batch's means and
            scaled to the batch, plus the means' own term, which is exact (before a batch norm the output
            gradients sum to zero and an uncentered sample would carry the inputs' mean); every other block
            stays exact. ``mode="fused"`` forms it so in the backward (``f`` in ``(0, 1]``);
            ``mode="parallel"`` has its backward keep those rows (``f = 1``: the whole batch's inputs and
            output gradients, until ``step()``) and forms the block in ``step()`` after its batched
            augmentation — the same ``G_S`` as ``fused`` with that ``f`` (float64 tests), at parallel's lower
            cost; ``0`` drops the block (parallel's default). Layers that see the whole ``∇W`` (a model that
            reads ``layer.weight``, Tucker cores run through their dense kernel) form it exactly from that.
            Measured: on ``vggsmall`` at 85 % c.r. ``f = 1/4`` kept the exact step's accuracy where dropping
            the block cost 2.3 points (README, "Options"). ``None``: the mode's own — 1 for ``fused`` and
            ``two_pass``, 0 for ``parallel``. Default: ``None``.
        second_moment (str): ``"squared"`` or ``"paper"``, see above. Default: ``"squared"``,
            which matched or beat the paper's rule on every preset of the README's comparison and
            did not diverge at learning rates where the paper's rule did.
        project_moments (bool): carry ``M`` and ``Q`` to the new bases as above. ``False`` is the
            "DLRT without projection" baseline: the moments stay in the old coordinates, cut to
            the new rank (``M ← M̂[:r₁, :r₁]``), as a naive implementation would. Default: ``True``.
        lr_scaling (str): what ``lr`` means for the coefficient. ``"dense"``: the step on the
            ``2r×2r`` coefficient is scaled by ``c = √(n·m/(2r)²)`` (for a Tucker core, entries of
            the kernel over entries of the augmented core), so that ``‖ΔW‖_F`` is what dense Adam
            with the same ``lr`` would take (``≈ lr·√(n·m)``) and one learning rate suits dense,
            LoRA and low-rank training alike. ``"none"``: Algorithm 2 as printed, every entry of
            ``S`` moves by about ``lr`` and ``‖ΔW‖_F ≈ lr·2r`` — 10–100× smaller on typical
            layers. ``"lora"``: scaled by ``√((n+m)·r/(2r)²)``, so that ``‖ΔW‖_F`` is what LoRA's
            Adam on ``A``, ``B`` takes at the same ``lr`` (``≈ lr·√((n+m)·r)``). The decay per step
            stays ``lr·wd`` either way. Default: ``"dense"``.
        new_moments (str): the moments of the new entries of ``S̄`` (outside the old ``r×r``
            block). ``"zero"``: ``diag(M, 0)``, ``diag(Q, 0)`` as the paper; with the bias
            correction of the layer's step ``t`` their first update is ``≈ 3.2·lr·sign(g)`` once
            ``t`` is large — a kick to every new direction, i.e. to the basis rotation, at every
            step. ``"second"``: ``Q`` there starts as ``(1 − β₂^(t−1))·G_S²`` (a fresh second
            moment, ``v̂ = g²``; update ``≈ 0.1·lr·sign(g)``); ``"both"``: ``M`` too
            (``m̂ = g``; update ``lr·sign(g)``, Adam's first step). ``"project"``: the moments
            of the directions the last truncation cut are kept (with those directions) and
            projected onto the next augmentation — the paper's projection applied to the whole
            augmented moment instead of its kept block; costs a second ``n×r``/``m×r`` pair of
            bases per layer (matrix layers; Tucker cores start at zero). Default: ``"zero"``.
        update_every (int): the bases are augmented and truncated once per ``update_every``
            steps: the first step of a cycle augments (``Û = [U | Ũ]``, ``V̂``) and keeps the
            augmented bases, the steps between update the ``2r×2r`` coefficient in them, the
            last truncates. ``1``: every step, as the paper. Larger values give the new
            directions several steps (and consistent moments) before the truncation decides
            and take one QR/SVD per cycle. Default: ``1``.
        basis_every (int): the other amortisation (GaLore's): one step in ``basis_every`` is
            the full step (augment, update, truncate); the steps between move ``S`` alone, in
            the bases and at the ranks the layers hold — their backward skips the basis
            gradients (two of a layer's six large products) and their ``step()`` has no QR, no
            SVD and no host synchronisation, so they cost about what LoRA's step costs.
            ``1``: every step, the paper. Not with ``update_every > 1``. Default: ``1``.
        coefficient_metric (str): how the step is spread over the entries of ``S̄``.
            ``"uniform"``: as Adam gives it, every entry by about ``lr`` (times ``c``) — the paper.
            ``"balanced"``: entry ``(i, j)`` weighted by ``√s_i + √s_j``, where ``s`` are the norms of
            the rows and columns of ``S`` (its singular values after a truncation; ``0`` for the new
            directions), the weights normalised to a root mean square of 1. This is the metric
            LoRA's Adam on ``A = U√Σ``, ``B = V√Σ`` induces on ``W``: directions of large singular
            values move and rotate more, the tail and the new directions less. Default: ``"uniform"``.
        target_cr (float | None): a compression ratio in percent (over all the model's parameters,
            against the dense model) that every truncation keeps, in place of ``tau``: the ranks of
            all layers are chosen together, under one parameter budget, by ``allocation``. Layers
            trade rank with each other; the model's size stays at the target. ``None``: the
            per-layer rule of ``tau``. Default: ``None``.
        max_params (int | None): the same, with the budget given as the number of parameters the
            factors (``U``, ``S``, ``V``) of all trained layers may hold together — for adapters,
            whose size is their trainable parameters (a fresh adapter's spectrum is flat, so a
            relative ``tau`` keeps almost all of it and the rank grows every step). ``None``: no
            budget. Default: ``None``.
        allocation (str): how ``target_cr``/``max_params`` share the budget among layers
            (:func:`~lrc.linalg.allocate_ranks`): ``"relative"`` keeps the singular values with the
            largest relative energy ``σ_i² / ‖W_ℓ‖²`` over all layers; ``"per-parameter"`` those with
            the most relative energy per parameter (it starves large layers at high compression).
            Default: ``"relative"``.
        fixed_ranks (bool): every layer keeps the rank it has (from ``factorize``: a rank, ``tau``,
            ``target_cr``, a calibrated truncation): the step still augments, updates and truncates
            ``Ŝ`` back to that rank — the bases rotate, the ranks do not adapt; ``tau``,
            ``target_cr`` and ``max_params`` then choose nothing. Default: ``False``.
        rank_every (int): the ranks are chosen (by ``tau``, ``target_cr`` or ``max_params``) on one
            truncation in ``rank_every`` — the first, then every ``rank_every``-th; the others keep
            every layer's rank, as ``fixed_ranks``. Choosing reads the new ranks from the device (on a
            GPU a synchronisation) and may change parameter shapes, which a compiled or captured
            step, DDP's buckets or a CUDA graph must then follow; between, shapes stay put and
            nothing is read. ``1``: every truncation chooses, as the paper. Default: ``1``.
        svd_batching (str): how the truncation's SVDs are called. ``"shape"``: one batched call per
            shape of ``Ŝ`` and two per Tucker core (LAPACK on the CPU gains nothing from more);
            ``"padded"``: every layer's ``Ŝ`` (and the channel unfoldings of Tucker cores) in one
            call (:func:`~lrc.linalg.padded_svds`: rectangular ones made square by a QR, all placed
            in one frame; equal to the shape-wise SVDs up to rounding) — on a GPU each
            ``torch.linalg.svd`` call waits for the device once, so this is one synchronisation
            instead of one per shape; ``"auto"``: ``"padded"`` on accelerators, ``"shape"`` on the
            CPU. Default: ``"auto"``.
        augmentation (str): how the new directions ``Ũ``, ``Ṽ`` are orthonormalized
            (:func:`~lrc.linalg.augment_basis`). ``"auto"``: on the CPU CholeskyQR2, checked on the
            host, with a Householder QR where the check fails; on accelerators a Householder QR.
            ``"sync_free"``: CholeskyQR2 made safe without a check (a shifted first pass, and fixed
            random directions where the gradient has none) — matrix products and two small
            Cholesky factorizations, no host read and no QR on any device (its first Gram in float64);
            the same directions to rounding wherever the gradient's singular values exceed
            ~``10·√n·ε`` times their root mean square (float32, ``n = 2048``: 5e-5), beyond which the
            checked path still resolves them. Default: ``"auto"``.
        capacity (int | None): hold every matrix layer with ``2·capacity ≤ min(n, m)`` at ``capacity``
            columns from its first truncation on: ``U``, ``S``, ``V`` and the moments keep their shapes
            and storage, the columns from the active rank on are zero, and the active rank is chosen on
            the device (a mask, no read) — so that ``step()`` reads nothing on the host (its SVDs
            aside, which on a GPU wait once per call: ``svd_batching="padded"`` makes that one call)
            and its shapes never change, as DDP's buckets need (a CUDA graph or a compiled step needs
            that and more: the step counters live on the host). The same training as without it with
            ``max_rank=capacity`` (float64 tests, every mode, to 1e-10); the new directions by the
            sync-free CholeskyQR2. It costs the products and SVDs at ``capacity`` instead of the active
            rank: choose it near the ranks expected. :meth:`compact` slices the layers to their active
            ranks (their real size, to count, evaluate or save; ``lrc train`` does it after every
            epoch). Other layers (Tucker cores, narrower matrices) step as without it. Not with
            ``update_every > 1``, a budget (``target_cr``, ``max_params``), ``project_moments=False``
            or ``new_moments="project"``. ``None``: shapes follow the ranks. Default: ``None``.
        truncation (str): how a step that keeps the ranks (``fixed_ranks``, or between the choices of
            ``rank_every``) cuts a matrix layer's ``Ŝ`` back. ``"svd"``: the SVD, as every step that
            chooses ranks. ``"subspace"``: two block power iterations from the kept directions
            (:func:`~lrc.linalg.subspace_truncation`: products and small Cholesky factorizations, no SVD,
            no host read; ``S`` is then not diagonal) — the SVD's truncation to rounding where the step is
            small against the gap below the kept singular values, another subspace of nearly the same
            energy where it is not. With ``capacity`` and ``augmentation="sync_free"`` such a step waits for
            nothing. Tucker cores keep the SVD. Default: ``"svd"``.
        capturable (bool): a step that can be captured in a CUDA graph (or compiled whole) and replayed: the
            step counters live on the parameters' device and each group's ``lr`` is a 0-d tensor there (in the
            parameters' dtype, at least float32; a scheduler updates it in place), the bias corrections are computed there, and
            every tensor the step writes keeps its storage — so that a replay counts, decays and follows the
            schedule as the eager step would (to rounding). Needs ``capacity``, ``augmentation="sync_free"`` and
            ``truncation="subspace"`` with every factorized layer held (no Tucker core, no matrix narrower than
            ``2·capacity``), ``mode`` ``"fused"`` or ``"parallel"``, ``update_every = basis_every = 1``. What it
            captures is a step that keeps the ranks: warm up eagerly (the first steps hold the layers at the
            capacity and may choose ranks), then set ``fixed_ranks`` (or construct with it) and capture; a step
            that chooses ranks takes an SVD and runs eagerly. :meth:`compact` changes shapes: capture again after
            it. Default: ``False``.
        distributed (bool | None): average gradients over the processes of ``torch.distributed``
            (one flat all-reduce per phase; the fused backward averages ``G_K``, ``G_L`` and
            ``G_S`` itself) and take rank 0's new ranks. ``None``: when a process group of
            more than one process is initialised. Do not wrap the model in DDP. Default: ``None``.

    The gradient fields of factorized layers are consumed (set to ``None``) by ``step()``,
    because a rank change changes their shapes.
    """

    _state_keys = ("exp_avg", "exp_avg_sq")
    _second_moment_keys = ("exp_avg_sq",)

    def __init__(self, model: nn.Module, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, tau: float = 0.1, min_rank: int = 1,
                 max_rank: int | None = None, mode: str = "fused", second_moment: str = "squared",
                 project_moments: bool = True, distributed: bool | None = None, lr_scaling: str = "dense",
                 new_moments: str = "zero", update_every: int = 1,
                 target_cr: float | None = None, max_params: int | None = None,
                 coefficient_metric: str = "uniform", allocation: str = "relative",
                 fixed_ranks: bool = False, rank_every: int = 1, svd_batching: str = "auto",
                 basis_every: int = 1, augmentation: str = "auto", capacity: int | None = None,
                 truncation: str = "svd", capturable: bool = False,
                 new_block_fraction: float | None = None) -> None:
        if capacity is not None and new_moments == "project":
            raise ValueError("capacity does not go with new_moments='project': the cut directions it carries "
                             "change shape; leave one of them out")
        if truncation == "subspace" and new_moments == "project":
            raise ValueError("truncation='subspace' does not go with new_moments='project': it needs the cut "
                             "directions an SVD gives; leave one of them out")
        if lr_scaling not in LR_SCALINGS:
            raise ValueError(f"Invalid lr_scaling: {lr_scaling!r} (one of {LR_SCALINGS})")
        if new_moments not in NEW_MOMENTS:
            raise ValueError(f"Invalid new_moments: {new_moments!r} (one of {NEW_MOMENTS})")
        if coefficient_metric not in COEFFICIENT_METRICS:
            raise ValueError(f"Invalid coefficient_metric: {coefficient_metric!r} (one of {COEFFICIENT_METRICS})")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid lr: {lr!r} (must be ≥ 0)")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid eps: {eps!r} (must be ≥ 0)")
        for i, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid betas[{i}]: {beta!r} (must lie in [0, 1))")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay: {weight_decay!r} (must be ≥ 0)")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(model, defaults, mode=mode, tau=tau, min_rank=min_rank, max_rank=max_rank,
                         second_moment=second_moment, project_moments=project_moments, distributed=distributed,
                         update_every=update_every, target_cr=target_cr,
                         max_params=max_params, allocation=allocation, fixed_ranks=fixed_ranks,
                         rank_every=rank_every, svd_batching=svd_batching, basis_every=basis_every,
                         augmentation=augmentation, capacity=capacity, truncation=truncation,
                         capturable=capturable, new_block_fraction=new_block_fraction)
        self.lr_scaling = lr_scaling
        self.new_moments = new_moments
        self.carry_moments = new_moments == "project"
        self.coefficient_metric = coefficient_metric

    def coefficient_step_weight(self, layer, S_bar: Tensor) -> Tensor | None:
        if self.coefficient_metric == "uniform":
            return None
        S = layer.S.detach()  # r_out × r_in (× kh × kw): row and column norms, zero for new directions
        dims = tuple(range(1, S.dim()))
        rows = S_bar.new_zeros(S_bar.shape[0])
        cols = S_bar.new_zeros(S_bar.shape[1])
        rows[: S.shape[0]] = torch.linalg.vector_norm(S, dim=dims).sqrt()
        cols[: S.shape[1]] = torch.linalg.vector_norm(S.transpose(0, 1), dim=dims).sqrt()
        weight = rows[:, None] + cols[None, :]
        rms = weight.square().mean().sqrt()
        # S = 0 (a fresh adapter): the metric gives no direction a weight; step every entry alike
        weight = torch.where(rms > 0, weight / rms.clamp_min(torch.finfo(weight.dtype).tiny), 1.0)
        return weight.reshape(*weight.shape, *([1] * (S_bar.dim() - 2)))

    def _fill_new_moments(self, padded: dict, G_S: Tensor, r_out: int, r_in: int, group: dict) -> None:
        if self.new_moments in ("zero", "project"):  # "project": filled by the base class
            return
        # With zero moments and the layer's step count t in the bias corrections, a new entry's
        # first update is (1−β₁)/√(1−β₂) ≈ 3.2 times lr·sign(g) at large t: a kick to every new
        # direction (and so to the basis rotation) at every step. Filled as if this gradient had
        # been seen from the first step on, the bias-corrected second moment is g² (and, with
        # "both", the first moment g): the new entry takes Adam's first step instead.
        t = padded["step"].to(torch.float64)  # β^(t−1) in float32 would be off by ~1e-5 relative
        beta1, beta2 = group["betas"]
        new = torch.ones(G_S.shape[:2], dtype=torch.bool, device=G_S.device)
        new[:r_out, :r_in] = False
        new = new.reshape(*new.shape, *([1] * (G_S.dim() - 2)))
        fill_sq = (1 - beta2 ** (t - 1)).to(G_S.dtype) * G_S.square()
        padded["exp_avg_sq"] = torch.where(new, fill_sq, padded["exp_avg_sq"])
        if self.new_moments == "both":
            padded["exp_avg"] = torch.where(new, (1 - beta1 ** (t - 1)).to(G_S.dtype) * G_S, padded["exp_avg"])

    def coefficient_lr_scale(self, layer, S_bar: Tensor) -> float:
        if self.lr_scaling == "none":
            return 1.0
        n, m, a, b = layer.U.shape[0], layer.V.shape[0], S_bar.shape[0], S_bar.shape[1]
        k, r = S_bar[0, 0].numel(), layer.S.shape[0]  # k: a Tucker core's spatial entries
        sqrt = math.sqrt
        if layer.rank_mask is not None:  # held at a capacity: its active rank r, augmented to 2r, on the device
            r, sqrt = layer.rank_mask.sum(), torch.sqrt
            a = b = r * (S_bar.shape[0] // layer.S.shape[0])  # 2r augmented, r inside a cycle (basis_every)
        if self.lr_scaling == "lora":  # √(entries of LoRA's A, B at this rank / entries of Ŝ)
            return sqrt((n + m * k) * r / (a * b * k))
        # √(entries of W / entries of Ŝ): n·m / (a·b), the spatial modes of a Tucker core cancel
        return sqrt(n * m / (a * b))

    def _update_(self, param: Tensor, grad: Tensor, state: dict, group: dict) -> None:
        beta1, beta2 = group["betas"]
        if self.capturable:  # the count (one per stacked layer) and lr on the device, never read
            adamw_device_update_(param, grad, state["exp_avg"], state["exp_avg_sq"], state["step"], lr=group["lr"],
                                 beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])
            return
        adamw_update_(param, grad, state["exp_avg"], state["exp_avg_sq"], int(state["step"].item()),
                      lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                      weight_decay=group["weight_decay"])

    def _update_many_(self, params: list[Tensor], grads: list[Tensor], states: list[dict], group: dict) -> None:
        if self.capturable:  # each tensor's own count, on the device
            return super()._update_many_(params, grads, states, group)
        beta1, beta2 = group["betas"]
        adamw_foreach_(params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                       int(states[0]["step"].item()), lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                       weight_decay=group["weight_decay"])
