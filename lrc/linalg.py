"""Pure functions on factors: basis augmentation, truncation, moment rotation.

Everything here works on plain tensors, holds no state and is differentiable-agnostic
(callers run it under ``torch.no_grad()``). Conventions follow DESIGN.md: a weight is
``W = U S Vᵀ`` with ``U`` (n×r) and ``V`` (m×r) orthonormal, ``S`` (r×r).
"""

from __future__ import annotations

import heapq
import math
from typing import Sequence

import torch
from torch import Tensor

__all__ = [
    "augment_basis",
    "pad_block",
    "mode_svds",
    "in_channel_modes",
    "sign_fixed_svd",
    "padded_svds",
    "subspace_truncation",
    "truncation_rank",
    "untruncated_rank",
    "clip_rank",
    "truncate",
    "allocate_ranks",
    "ALLOCATIONS",
    "factor_parameter_count",
    "input_whitener",
    "left_svd",
    "product_svd",
    "rotate_first_moment",
    "rotate_second_moment",
    "SECOND_MOMENT_RULES",
]

SECOND_MOMENT_RULES = ("paper", "squared")


def augment_basis(U: Tensor, G: Tensor, UtG: Tensor | None = None, sync_free: bool = False,
                  mask: Tensor | None = None) -> Tensor:
    """New orthonormal directions ``Ũ`` that extend ``U`` towards ``G``.

    Returns ``Ũ`` (n×k) with orthonormal columns, orthogonal to ``U``, such that
    ``span([U | Ũ]) ⊇ span(G)`` whenever ``(I − UUᵀ)G`` has full column rank.
    ``k = min(G.shape[1], n − r)``: the augmented basis ``[U | Ũ]`` never exceeds
    the dimension ``n``. ``UtG``, if given, is ``Uᵀ G`` (callers often have it already).
    ``Ũ`` is the Q factor, with a non-negative diagonal of ``R``,
    of ``P = (I − UUᵀ)G`` (projected twice, "twice is enough"): the result does not
    depend on the LAPACK/cuSOLVER sign convention.

    Two ways to the same ``Ũ`` (equal up to rounding):

    * on the CPU, first CholeskyQR2 with a re-projection against ``U`` between its
      passes (matrix products only: about 4× faster than a Householder QR of
      ``[U | P]`` on two cores). Its result is checked; when ``P`` is rank-deficient or
      too ill-conditioned the check fails and the second way is taken;
    * a Householder QR of ``[U | P]``, whose Q is orthogonal whatever the rank of its
      input, so that a zero or rank-deficient gradient still gives orthonormal
      directions orthogonal to ``U`` (they carry no gradient; the truncation drops
      them) and never a NaN. Used on accelerators (no host synchronisation).

    With ``sync_free=True``, on any device: CholeskyQR2 that
    reads nothing on the host and needs no fallback (:func:`_cholesky_qr2_repaired`):
    matrix products and two ``k×k`` Cholesky factorizations, where a Householder QR is a
    sequential panel factorization with no batched kernel. Its first Gram and Cholesky
    factorization run in float64, so it equals the other two to rounding wherever ``P``'s
    singular values exceed ~``10·√n·ε`` times their root mean square (``ε`` the dtype's; 5e-5 in
    float32 at ``n = 2048``; in float64 ``√(10·√n·ε)``); directions below are filled as a
    rank-deficient gradient's are. A layer near full rank (``k`` below ``G``'s width) takes the
    Householder QR.

    ``mask`` (``r`` values, 1 then 0): a layer held at a fixed capacity (see ``capacity`` of
    :class:`~lrc.LowRankAdam`) whose columns of ``U`` — and so of ``G = ∇W V``, ``V``'s masked
    columns being zero too — are zero where the mask is 0. Then the sync-free CholeskyQR2 runs with
    the empty columns' Gram set to the identity: ``Ũ`` has zero columns there and, on the others,
    the columns the same call on the active part alone gives (CholeskyQR's column ``j`` depends on
    columns ``≤ j`` only). Needs ``2r ≤ n``.

    A batch (``U`` ``(…, n, r)``, ``G`` ``(…, n, p)``, ``mask`` ``(…, r)``) gives each matrix what it
    would give alone (to rounding): the checked CholeskyQR2 reads its checks once for the batch and
    takes the Householder QR for the matrices that fail them.
    """
    n, r = U.shape[-2:]
    k = min(G.shape[-1], n - r)
    if k <= 0:
        return U.new_zeros(*U.shape[:-2], n, 0)
    P = G - U @ (U.mT @ G if UtG is None else UtG)
    if mask is not None:
        if k != G.shape[-1]:
            raise ValueError(f"a masked basis of {r} columns needs 2·{r} ≤ {n} rows")
        return _cholesky_qr2_repaired(U, P, mask)
    if k == G.shape[-1]:
        if sync_free:
            return _cholesky_qr2_repaired(U, P)
        if U.device.type == "cpu":
            Q, ok = _cholesky_qr2_against(U, P)
            if all(ok):
                return Q
            if U.dim() > 2 and any(ok):  # a batch: Householder for the matrices that failed the check
                bad = torch.tensor([i for i, good in enumerate(ok) if not good])
                Q = Q.reshape(-1, n, k).clone()
                Q[bad] = _householder_against(U.reshape(-1, n, r)[bad], P.reshape(-1, n, k)[bad], k)
                return Q.reshape(P.shape)
    return _householder_against(U, P, k)


def _householder_against(U: Tensor, P: Tensor, k: int) -> Tensor:
    """The ``k`` new orthonormal directions of ``P`` (projected against ``U`` once more) by a Householder
    QR of ``[U | P]``, signed to a non-negative diagonal of ``R``: orthonormal whatever ``P``'s rank."""
    r = U.shape[-1]
    P = P - U @ (U.mT @ P)
    Q, R = torch.linalg.qr(torch.cat([U, P], dim=-1))
    d = torch.diagonal(R[..., r:, r:], dim1=-2, dim2=-1)[..., :k]
    sign = torch.where(d < 0, -1.0, 1.0).to(Q.dtype)
    return Q[..., r : r + k] * sign[..., None, :]


def _cholesky_qr2_against(U: Tensor, P: Tensor) -> tuple[Tensor, list[bool]]:
    """CholeskyQR2 of ``P`` with a re-projection against ``U`` between the passes, and whether it
    may be trusted (per matrix of a batch; one read of the device).

    A matrix passes if both Cholesky factorizations succeed and the second one is close to the
    identity: then the first pass's Q was well conditioned, and the second pass's Q is orthonormal
    and orthogonal to ``U`` to working precision (Yamamoto et al., "Roundoff error analysis of the
    CholeskyQR2 algorithm", 2015). Where it fails, its Q is garbage (possibly NaN) and the caller
    takes the Householder QR. Where every first factorization fails (a gradient of lower rank than
    its width: a batch smaller than the rank), the second pass is skipped.
    """
    R1, info1 = torch.linalg.cholesky_ex(P.mT @ P, upper=True)
    if info1.all().item():
        return P, [False] * (P.numel() // (P.shape[-2] * P.shape[-1]))
    eye = torch.eye(R1.shape[-1], dtype=R1.dtype, device=R1.device)
    Q = P @ torch.linalg.solve_triangular(R1, eye, upper=True)  # r×r inverse, then one GEMM
    Q = Q - U @ (U.mT @ Q)
    R2, info2 = torch.linalg.cholesky_ex(Q.mT @ Q, upper=True)
    near = (R2 - eye).abs().amax(dim=(-2, -1)) <= 0.25  # NaN compares False
    ok = (info1 == 0) & (info2 == 0) & near
    return Q @ torch.linalg.solve_triangular(R2, eye, upper=True), ok.reshape(-1).tolist()


def _cholesky_qr2_repaired(U: Tensor, P: Tensor, mask: Tensor | None = None) -> Tensor:
    """CholeskyQR2 of ``P`` (n×k, orthogonal to ``U``) against ``U``, with no host read and
    no fallback: a Q with orthonormal columns, orthogonal to ``U``, for any ``P`` — zero,
    rank-deficient or ill-conditioned.

    ``P`` is scaled to a mean squared singular value of 1 (``‖P‖_F² = k``) and its Gram, formed in
    float64, shifted by ``μ = 10·√n·ε`` (float64 ``P``) or ``(10·√n·ε)²`` (lower precision; ``ε``
    the dtype's) (more than the Gram's rounding, so the first Cholesky
    factorization always succeeds; the shift does not change the span). Where ``P`` has
    directions with ``σ² ≲ μ`` the first pass's Q would be rank-deficient; those directions
    get a fixed random direction instead, through ``X = P + √μ · Ω · F²`` with
    ``F = μ(PᵀP + μI)⁻¹`` (``Ω`` orthonormal, seeded: the same on every process): ``F`` is
    ≈ I on such directions and ≈ ``μ/σ²`` on the others, so ``X R₁⁻¹`` has singular values
    in about [0.45, 1] and a direction with ``σ² ≫ μ`` keeps its span to rounding (moved by
    ``√μ·(μ/σ²)²·σ⁻¹`` relative). Then the re-projection against ``U`` and the second pass,
    as :func:`_cholesky_qr2_against`.

    ``mask`` (k values, 1 then 0; ``P`` zero where it is 0): the empty columns get a unit Gram in
    both passes, which keeps both factorizations block diagonal — the active columns come out as
    without them, the empty ones zero (see :func:`augment_basis`)."""
    n, k = P.shape[-2:]
    eps = 10.0 * math.sqrt(n) * torch.finfo(P.dtype).eps  # the relative rounding of products in P's dtype
    # The first Gram and its Cholesky factorization are taken in float64 whatever P's dtype, so that below
    # float64 the shift only has to cover the rounding of the products in P's dtype (ε'²): directions down to
    # ~ε' of the RMS (5e-5 in float32 at n = 2048) are resolved instead of filled. Filled from √ε' (6e-3) on,
    # as a float32 Gram needs, the new directions lost 1.2 points on digits-mlp (5 seeds) against the checked
    # path. (A first pass wholly in float64 resolves them further still, but costs 1.2× the fused step on
    # 2 CPU cores; this one 1.05×.)
    gram = torch.float64
    mu = eps if P.dtype == gram else eps * eps
    eye = torch.eye(k, dtype=gram, device=P.device)
    tiny = torch.finfo(P.dtype).tiny
    # the active columns (per matrix of a batch), where μ goes, and the empty columns' unit Gram
    width = k if mask is None else mask.sum(-1, keepdim=True)[..., None].to(gram)
    shift = eye if mask is None else torch.diag_embed(mask.to(gram))
    hole = None if mask is None else torch.diag_embed(1.0 - mask.to(gram))
    # first to entries ≤ 1 (the norm of huge ones would overflow), then to a mean squared singular value of 1
    P = P / P.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(tiny)
    root = width**0.5 if mask is None else (width**0.5).to(P.dtype)
    P = P / (torch.linalg.vector_norm(P, dim=(-2, -1), keepdim=True) / root).clamp_min(tiny)
    P_gram = P.to(gram)
    A = P_gram.mT @ P_gram
    if hole is not None:
        A = A + hole
    R1, info = torch.linalg.cholesky_ex(A + mu * shift, upper=True)
    # the Gram's rounding grows with its largest eigenvalue (≤ k here): where μ was not enough
    # (a nearly rank-one P), the shift μ·k, which always is — chosen on the device
    R1_safe, _ = torch.linalg.cholesky_ex(A + (mu * width) * shift, upper=True)
    ok = (info == 0)[..., None, None]
    R1 = torch.where(ok, R1, R1_safe)
    mu = torch.where(ok, mu, mu * width)
    R1_inv = torch.linalg.solve_triangular(R1, eye, upper=True)
    F = mu * (R1_inv @ R1_inv.mT)  # μ(PᵀP + μI)⁻¹
    X = P + _filler(n, k, P.dtype, P.device) @ (mu.sqrt() * (F @ F)).to(P.dtype)
    if mask is not None:
        X = X * mask[..., None, :].to(X.dtype)
    Q = X @ R1_inv.to(P.dtype)
    Q = Q - U @ (U.mT @ Q)
    B = Q.mT @ Q
    if hole is not None:
        B = B + hole.to(B.dtype)
    R2, _ = torch.linalg.cholesky_ex(B, upper=True)
    return Q @ torch.linalg.solve_triangular(R2, eye.to(P.dtype), upper=True)


_FILLER_WIDTH = 256
_fillers: dict = {}  # (n, dtype, device) -> the filler of _cholesky_qr2_repaired


def _filler(n: int, k: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The first ``k`` columns of a fixed matrix with orthonormal columns (``n`` rows), made on
    the device from a seeded generator (no copy from the host; the same on every process) and
    kept per ``(n, dtype, device)``. Its columns do not depend on how wide it was made (the
    Gaussian's columns come first in the generator's stream, and a QR's first columns depend
    on the first columns only), so a run and its resumption fill alike."""
    key = (n, dtype, torch.device(device))
    cached = _fillers.get(key)
    if cached is None or cached.shape[1] < k:
        width = min(n, max(_FILLER_WIDTH, 2 * k))
        generator = torch.Generator(device=device).manual_seed(20_250_101 + n)
        A = torch.randn(width, n, generator=generator, device=device,
                        dtype=torch.float64 if torch.device(device).type == "cpu" else torch.float32).mT
        cached = _fillers[key] = torch.linalg.qr(A).Q.to(dtype)
    return cached[:, :k]


def subspace_truncation(S_hat: Tensor, keep: Tensor, iterations: int = 2) -> tuple[Tensor, Tensor, Tensor]:
    """A truncation of ``Ŝ`` (a batch ``(…, a, b)``) at a rank it keeps, by matrix products and small
    Cholesky factorizations only (no SVD, no host read): ``(P₁, S₁, R₁)`` with ``P₁``, ``R₁`` orthonormal
    bases of (approximately) ``Ŝ``'s top left and right singular subspaces and ``S₁ = P₁ᵀ Ŝ R₁`` (square,
    not diagonal), so that ``Ŝ ≈ P₁ S₁ R₁ᵀ``.

    ``P₁`` comes from ``iterations`` block power iterations ``P ← orth(Ŝ Ŝᵀ P)`` started at the first
    coordinates ``P₀ = [I; 0]`` — after a truncation, the kept directions, which one step moves little — and
    ``R₁ = orth(Ŝᵀ P₁)``, so that ``P₁ S₁ R₁ᵀ = P₁ P₁ᵀ Ŝ``. Where the step is small against the gap between
    the kept singular values and the rest, this is the SVD's truncation to rounding (subspace error
    ``∝ (σ_{r+1}/σ_r)^(2·iterations)``); where the gap closes it picks another subspace of nearly the same
    energy. ``keep`` (``(…, w)``, 1 then 0): the columns of ``P₀`` to use — all ones for rank ``w``; a layer
    held at a capacity ``w`` has zeros for its empty columns, which stay zero. Orthonormalized by a
    Householder QR on the CPU, by the sync-free CholeskyQR2 of :func:`augment_basis` elsewhere."""
    a, w = S_hat.shape[-2], keep.shape[-1]
    keep = keep.to(S_hat.dtype)
    P = torch.eye(a, w, dtype=S_hat.dtype, device=S_hat.device) * keep[..., None, :]
    for _ in range(iterations):
        P = _orthonormal_columns(S_hat @ (S_hat.mT @ P), keep)
    R = _orthonormal_columns(S_hat.mT @ P, keep)
    return P, P.mT @ S_hat @ R, R


def _orthonormal_columns(A: Tensor, keep: Tensor) -> Tensor:
    """The Q of ``A = QR`` with ``R``'s diagonal ≥ 0 (a batch), its columns zero where ``keep`` is 0: on the
    CPU a Householder QR (2.4× faster there than the CholeskyQR2 for 128×64), elsewhere the sync-free
    CholeskyQR2 of :func:`augment_basis` — the same columns to rounding where ``A`` has full column rank."""
    if A.device.type == "cpu":
        Q, R = torch.linalg.qr(A)
        sign = torch.where(torch.diagonal(R, dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(Q.dtype)
        return Q * (sign * keep)[..., None, :]
    return _cholesky_qr2_repaired(A.new_zeros(A.shape[-2], 0), A, keep)


def pad_block(A: Tensor, rows: int, cols: int) -> Tensor:
    """``diag(A, 0)``: ``A`` in the top-left corner of a zero ``rows×cols`` matrix. A
    tensor with more modes (a Tucker core ``r_out×r_in×kh×kw``) is padded in its first two."""
    out = A.new_zeros(rows, cols, *A.shape[2:])
    out[: A.shape[0], : A.shape[1]] = A
    return out


def mode_svds(C: Tensor) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Sign-fixed SVDs of the two channel-mode unfoldings of a Tucker core
    (``r_out×r_in×kh×kw``): ``((P_out, σ_out), (P_in, σ_in))``, the left singular vectors
    and values of ``Mat₁(C)`` and ``Mat₂(C)``. Both ``σ`` have the norm ``‖C‖_F``."""
    out = [left_svd(C.movedim(mode, 0).reshape(C.shape[mode], -1)) for mode in (0, 1)]
    return out[0], out[1]


def left_svd(A: Tensor) -> tuple[Tensor, Tensor]:
    """``(P, σ)`` of :func:`sign_fixed_svd` without the right vectors. A wide ``A`` (a Tucker
    unfolding, ``k × k·kh·kw``) goes through the QR ``Aᵀ = Q R``: ``A = Rᵀ Qᵀ`` has the left
    singular vectors and values of the ``k×k`` matrix ``Rᵀ`` — the same values up to rounding,
    2–3× faster than the SVD of the wide matrix on a CPU."""
    if A.shape[-1] > A.shape[-2]:
        A = torch.linalg.qr(A.mT)[1].mT
    P, sigma, _ = sign_fixed_svd(A)
    return P, sigma


def in_channel_modes(fn, T: Tensor, P_out: Tensor, P_in: Tensor, *args) -> Tensor:
    """Apply a matrix rule ``fn(X, P, R, *args)`` (such as :func:`rotate_first_moment`)
    to each spatial slice ``T[:, :, i, j]`` of a Tucker core or moment: for the rotations
    that is ``T ×₁ P_outᵀ ×₂ P_inᵀ``."""
    return fn(T.permute(2, 3, 0, 1), P_out, P_in, *args).permute(2, 3, 0, 1).contiguous()


def input_whitener(gram: Tensor, damping: float = 1e-4) -> Tensor | None:
    """The lower Cholesky factor ``L`` of a layer's input second moment, ``gram / mean(diag) +
    damping·I = L Lᵀ`` (float64): ``‖(W − Ŵ) X‖`` over inputs ``X`` is ``‖(W − Ŵ) L‖`` up to a
    constant, so the best rank-``r`` ``Ŵ`` for those inputs is ``[W L]_r L⁻¹``. ``damping``
    (relative to the mean input energy) keeps directions the inputs never took in play. ``None``
    when the inputs were all zero (nothing to weight by)."""
    gram = gram.double()
    scale = gram.diagonal().mean()
    if not torch.isfinite(scale) or scale <= 0:
        return None
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    L, info = torch.linalg.cholesky_ex(gram / scale + damping * eye)
    return L if info.item() == 0 else None


def product_svd(X: Tensor, Y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD ``X Yᵀ = U diag(σ) Vᵀ`` of a product of ``X`` (n×r) and ``Y`` (m×r), through a
    QR of each and the SVD of an r×r matrix (never the n×m product); sign-fixed as
    :func:`sign_fixed_svd`. Returns ``(U, σ, V)``."""
    Q1, R1 = torch.linalg.qr(X)
    Q2, R2 = torch.linalg.qr(Y)
    P, sigma, R = sign_fixed_svd(R1 @ R2.mT)
    return Q1 @ P, sigma, Q2 @ R


def sign_fixed_svd(A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD ``A = P diag(σ) Rᵀ`` with a machine-independent sign per pair.

    Each singular pair is signed so that the largest-magnitude entry of its column
    of ``P`` is positive. Returns ``(P, σ, R)`` (note ``R``, not ``Rᵀ``). Works on a
    batch ``(..., m, n)`` as well.
    """
    P, sigma, Rh = torch.linalg.svd(A, full_matrices=False)
    P, R = _fix_signs(P, Rh.mT)
    return P, sigma, R


def padded_svds(mats: Sequence[Tensor], right: Sequence[bool] | None = None) -> list[tuple]:
    """:func:`sign_fixed_svd` of matrices of different shapes in one ``torch.linalg.svd`` call (per
    dtype and device).

    On a GPU every ``torch.linalg.svd`` call waits for the device once (its error check), so one
    call per shape costs one synchronisation per shape. Here a rectangular ``A`` is first made
    square by a QR (``A = Q R`` when tall: the SVD of ``R``, left vectors ``Q P``; of ``Aᵀ`` when wide:
    the SVD of ``Rᵀ``, right vectors ``Q R̃``), which keeps its singular values and vectors. Each
    square ``B`` (k×k) is then placed in a common K×K frame as ``diag(B, c·I)`` with ``c = 2‖B‖_F``
    (1 for a zero ``B``): ``c`` exceeds every singular value of ``B``, so the frame's singular values
    are ``K − k`` copies of ``c`` and then ``B``'s, and, the padding block being invertible, ``B``'s
    singular vectors (those of zero singular values too) lie in ``B``'s own coordinates — sliced
    out, they are ``B``'s SVD. Returns ``(P, σ, R)`` per matrix (thin: ``min(a, b)`` pairs), ``R``
    ``None`` where ``right[i]`` (default: all true) is false; equal to :func:`sign_fixed_svd` of each
    up to rounding."""
    right = [True] * len(mats) if right is None else list(right)
    squares, maps = [], []
    for A in mats:
        a, b = A.shape
        if a > b:
            Q, R = torch.linalg.qr(A)
            squares.append(R)
            maps.append((Q, None))
        elif a < b:
            Q, R = torch.linalg.qr(A.mT)
            squares.append(R.mT)
            maps.append((None, Q))
        else:
            squares.append(A)
            maps.append((None, None))
    groups: dict[tuple, list[int]] = {}
    for i, B in enumerate(squares):
        groups.setdefault((B.dtype, B.device), []).append(i)
    out: list = [None] * len(mats)
    for (dtype, device), idx in groups.items():
        size = max(squares[i].shape[0] for i in idx)
        frame = torch.zeros(len(idx), size, size, dtype=dtype, device=device)
        norms = torch.stack([torch.linalg.vector_norm(squares[i]) for i in idx])
        pad = torch.where(norms > 0, 2 * norms, torch.ones_like(norms))
        for j, i in enumerate(idx):
            k = squares[i].shape[0]
            frame[j, :k, :k] = squares[i]
            if size > k:
                frame[j, k:, k:].diagonal().copy_(pad[j].expand(size - k))
        P, sigma, Rh = torch.linalg.svd(frame, full_matrices=False)
        for j, i in enumerate(idx):
            k = squares[i].shape[0]
            p = size - k
            (Q_left, Q_right), left = maps[i], P[j, :k, p:]
            rvec = Rh[j, p:, :k].mT if right[i] else None
            if Q_left is not None:
                left = Q_left @ left
            if Q_right is not None and rvec is not None:
                rvec = Q_right @ rvec
            left, rvec = _fix_signs(left, rvec)
            out[i] = (left, sigma[j, p:], rvec)
    return out


def _fix_signs(P: Tensor, R: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Each singular pair signed so that the largest-magnitude entry of its column of ``P`` is positive."""
    idx = P.abs().argmax(dim=-2, keepdim=True)
    sign = torch.where(torch.gather(P, -2, idx) < 0, -1.0, 1.0).to(P.dtype)
    return P * sign, None if R is None else R * sign


def untruncated_rank(sigma: Tensor, tau: float | Tensor) -> Tensor:
    """Smallest ``r₁`` with ``‖σ[r₁:]‖₂ ≤ τ‖σ‖₂``, on the device (no synchronisation).

    ``sigma`` holds singular values in descending order along its last dimension
    (a batch is fine; ``tau`` may then be a tensor of one tolerance per row). ``τ = 0``
    keeps every non-zero value.
    """
    sq = sigma.double() ** 2
    tail = torch.flip(torch.cumsum(torch.flip(sq, (-1,)), -1), (-1,)).sqrt()
    tau = torch.as_tensor(tau, dtype=tail.dtype, device=tail.device)
    threshold = tau * tail[..., :1].squeeze(-1)
    return (tail > threshold.unsqueeze(-1)).sum(-1)


def clip_rank(rank: int, size: int, min_rank: int = 1, max_rank: int | None = None) -> int:
    """``rank`` clipped to ``[min_rank, max_rank]`` and never above ``size``."""
    upper = size if max_rank is None else min(max_rank, size)
    return max(min(rank, upper), min(min_rank, upper))


def truncation_rank(sigma: Tensor, tau: float, min_rank: int = 1, max_rank: int | None = None) -> int:
    """:func:`untruncated_rank` of one vector of singular values, read from the device
    and clipped by :func:`clip_rank`."""
    if len(sigma) == 0:
        return 0
    return clip_rank(int(untruncated_rank(sigma, tau)), len(sigma), min_rank, max_rank)


def truncate(
    S_hat: Tensor, tau: float, min_rank: int = 1, max_rank: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Truncated, sign-fixed SVD of ``Ŝ``: returns ``(P₁, σ₁, R₁)`` at the rank of
    :func:`truncation_rank`, so that ``Ŝ ≈ P₁ diag(σ₁) R₁ᵀ``."""
    P, sigma, R = sign_fixed_svd(S_hat)
    r1 = truncation_rank(sigma, tau, min_rank, max_rank)
    return P[:, :r1], sigma[:r1], R[:, :r1]


def factor_parameter_count(shape: Sequence[int], ranks: Sequence[int], kind: str = "lowrank") -> int:
    """Parameters of a layer's factors at ``ranks``: ``U S Vᵀ`` of an n×m matrix
    (``shape = (n, m)``, one rank) holds ``r(n + m) + r²``; LoRA's ``A Bᵀ`` ``r(n + m)``; a Tucker
    kernel (``shape = (out, in, kh·kw)``, ranks ``(r_out, r_in)``) ``out·r_out + in·r_in +
    r_out·r_in·kh·kw`` — ``math.inf`` where one rank exceeds the other times ``kh·kw``, which the
    core's unfolding cannot hold."""
    if len(ranks) == 2:
        (out, inp, k), (r_out, r_in) = shape, ranks
        if r_out > r_in * k or r_in > r_out * k:  # the core's unfoldings cannot hold that rank
            return math.inf
        return out * r_out + inp * r_in + r_out * r_in * k
    (n, m), (r,) = shape, ranks
    return r * (n + m) + (0 if kind == "lora" else r * r)


ALLOCATIONS = ("relative", "per-parameter")


def allocate_ranks(spectra: Sequence[Sequence[Sequence[float]]], cost, budget: int,
                   floors: Sequence[Sequence[int]], caps: Sequence[Sequence[int]],
                   allocation: str = "relative") -> list[tuple[int, ...]]:
    """Ranks for many layers under one parameter budget (a global truncation).

    Layer ``ℓ`` has one mode (a matrix: the singular values of ``W``) or two (a Tucker core:
    those of its two channel-mode unfoldings), each descending; ``cost(ℓ, ranks)`` is its
    parameter count at ``ranks``. Starting from ``floors``, singular values are kept greedily,
    in the order of their relative energy ``σ_i² / Σ σ_j²`` in their layer (and mode), while
    they fit ``Σ_ℓ cost(ℓ, ranks_ℓ) ≤ budget``, never beyond ``caps``; a zero singular value is
    never kept. ``allocation``:

    * ``"relative"``: by relative energy alone — one threshold on ``σ_i / ‖W_ℓ‖`` for all layers,
      wherever the parameters go;
    * ``"per-parameter"``: by relative energy per added parameter — the greedy solution of
      "minimise the sum of the layers' relative truncation errors ``Σ_{i>r} σ_i² / Σ σ_i²``"
      (the Lagrangian relaxation when costs are linear in the rank). It starves expensive
      layers at high compression (measured: the 576×128 layer of vgg_small cut to rank 1).
    Host-side Python on lists (a few thousand values: well under a millisecond per hundred).
    A ``cost`` of ``math.inf`` marks ranks a layer cannot use (a Tucker core's ``r_out`` above
    ``r_in·kh·kw``): that growth waits until the other mode has grown. Raises ``ValueError`` if
    ``floors`` alone exceed ``budget``.
    """
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    per_parameter = allocation == "per-parameter"
    ranks = [list(f) for f in floors]
    spent = sum(cost(i, tuple(r)) for i, r in enumerate(ranks))
    if spent > budget:
        raise ValueError(f"the budget of {budget:,} parameters is below the {spent:,} the smallest ranks need")
    totals = [[sum(s * s for s in sigma) for sigma in modes] for modes in spectra]

    def entry(i: int, mode: int):
        r = ranks[i][mode]
        sigma = spectra[i][mode]
        if r >= caps[i][mode] or r >= len(sigma) or not totals[i][mode] or sigma[r] <= 0:
            return None
        grown = list(ranks[i])
        grown[mode] += 1
        added = cost(i, tuple(grown)) - cost(i, tuple(ranks[i]))
        gain = sigma[r] * sigma[r] / totals[i][mode]
        return (-gain / (max(added, 1) if per_parameter else 1), i, mode, r, added)

    # An entry's key depends on its layer's ranks only: whenever a layer grows, every mode of it gets
    # a fresh entry and a new version; entries of an older version are dropped when they come up
    # (re-queuing them would keep one more duplicate alive per growth: quadratic in the ranks).
    version = [[0] * len(modes) for modes in spectra]
    heap = [(*e, 0) for i, modes in enumerate(spectra) for mode in range(len(modes)) if (e := entry(i, mode))]
    heapq.heapify(heap)
    while heap:
        _, i, mode, r, added, v = heapq.heappop(heap)
        if v != version[i][mode]:
            continue
        if spent + added > budget:  # does not fit: this mode stops growing, cheaper ones may go on
            continue
        ranks[i][mode] += 1
        spent += added
        for other in range(len(spectra[i])):  # this mode again; the others' costs changed (or they unblocked)
            version[i][other] += 1
            if (e := entry(i, other)) is not None:
                heapq.heappush(heap, (*e, version[i][other]))
    return [tuple(r) for r in ranks]


def rotate_first_moment(M: Tensor, P1: Tensor, R1: Tensor) -> Tensor:
    """First moment (or momentum) in the new coefficient basis: ``P₁ᵀ M R₁``."""
    return P1.mT @ M @ R1


def rotate_second_moment(Q: Tensor, P1: Tensor, R1: Tensor, rule: str = "paper") -> Tensor:
    """Element-wise second moment in the new coefficient basis.

    ``"paper"``: ``(P₁ᵀ √Q R₁)²`` (the paper's choice); ``"squared"``:
    ``(P₁∘P₁)ᵀ Q (R₁∘R₁)``, the variance of a linear map of independent entries.
    Both keep ``Q`` non-negative.
    """
    if rule == "paper":
        return (P1.mT @ Q.sqrt() @ R1).square()
    if rule == "squared":
        return P1.square().mT @ Q @ R1.square()
    raise ValueError(f"second_moment must be one of {SECOND_MOMENT_RULES}, got {rule!r}")
