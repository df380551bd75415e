import pytest
import torch

from lrc.linalg import (
    augment_basis,
    pad_block,
    padded_svds,
    rotate_first_moment,
    rotate_second_moment,
    sign_fixed_svd,
    truncate,
    truncation_rank,
)

f64 = torch.float64


def orthonormal(n, r):
    return torch.linalg.qr(torch.randn(n, r, dtype=f64)).Q


def test_augment_basis_is_orthonormal_orthogonal_and_spans_the_gradient():
    U, G = orthonormal(50, 6), torch.randn(50, 6, dtype=f64)
    Ut = augment_basis(U, G)
    assert Ut.shape == (50, 6)
    Uh = torch.cat([U, Ut], 1)
    assert torch.allclose(Uh.T @ Uh, torch.eye(12, dtype=f64), atol=1e-12)
    # span([U | Ũ]) contains G exactly
    assert (G - Uh @ (Uh.T @ G)).norm() < 1e-12 * G.norm()


def test_augment_basis_sign_convention_is_qr_with_nonnegative_diagonal():
    U, G = orthonormal(30, 4), torch.randn(30, 4, dtype=f64)
    P = G - U @ (U.T @ G)
    Q, R = torch.linalg.qr(P)
    Q = Q * torch.sign(torch.diagonal(R))
    assert torch.allclose(augment_basis(U, G), Q, atol=1e-12)
    assert torch.allclose(augment_basis(U, -G), -Q, atol=1e-12)  # the convention, not LAPACK, decides


@pytest.mark.parametrize("n, r, k", [(10, 6, 4), (12, 6, 6), (6, 6, 0)])
def test_augment_basis_width_is_capped_at_the_dimension(n, r, k):
    U = orthonormal(n, r)
    Ut = augment_basis(U, torch.randn(n, r, dtype=f64))
    assert Ut.shape == (n, k)
    if k:
        assert torch.allclose(U.T @ Ut, torch.zeros(r, k, dtype=f64), atol=1e-12)


@pytest.mark.parametrize("G_kind", ["zero", "rank1", "in_span"])
@pytest.mark.parametrize("U_kind", ["random", "identity"])
def test_augment_basis_rank_deficient_gradient_gives_no_nan(G_kind, U_kind):
    n, r = 20, 5
    U = orthonormal(n, r) if U_kind == "random" else torch.eye(n, r, dtype=f64)
    G = {"zero": torch.zeros(n, r, dtype=f64),
         "rank1": torch.randn(n, 1, dtype=f64) @ torch.randn(1, r, dtype=f64),
         "in_span": U @ torch.randn(r, r, dtype=f64)}[G_kind]
    Ut = augment_basis(U, G)
    Uh = torch.cat([U, Ut], 1)
    assert torch.isfinite(Ut).all()
    assert torch.allclose(Uh.T @ Uh, torch.eye(2 * r, dtype=f64), atol=1e-12)
    assert (G - Uh @ (Uh.T @ G)).norm() <= 1e-12 * max(G.norm().item(), 1.0)


def test_pad_block():
    A = torch.arange(6.0).reshape(2, 3)
    B = pad_block(A, 4, 5)
    assert B.shape == (4, 5) and torch.equal(B[:2, :3], A) and B.sum() == A.sum()


@pytest.mark.parametrize("tau, expected", [
    # sigma = [4, 2, 1, 0.5]; ‖σ‖ = sqrt(21.25) = 4.6098; tails: [4.6098, 2.2913, 1.1180, 0.5, 0]
    (0.0, 4), (0.05, 4), (0.109, 3), (0.25, 2), (0.49, 2), (0.5, 1), (0.99, 1),
])
def test_truncation_rank_on_hand_made_singular_values(tau, expected):
    sigma = torch.tensor([4.0, 2.0, 1.0, 0.5], dtype=f64)
    assert truncation_rank(sigma, tau) == expected


def test_truncation_rank_clipping_and_zeros():
    sigma = torch.tensor([4.0, 2.0, 1.0, 0.5], dtype=f64)
    assert truncation_rank(sigma, 0.9, min_rank=3) == 3
    assert truncation_rank(sigma, 0.0, max_rank=2) == 2
    assert truncation_rank(sigma, 0.0, min_rank=9) == 4  # never above len(sigma)
    assert truncation_rank(torch.tensor([3.0, 1.0, 0.0, 0.0], dtype=f64), 0.0) == 2  # τ=0 drops exact zeros
    assert truncation_rank(torch.zeros(3, dtype=f64), 0.1) == 1  # all zero: min_rank


def test_sign_fixed_svd_reconstructs_and_fixes_signs():
    A = torch.randn(7, 5, dtype=f64)
    P, s, R = sign_fixed_svd(A)
    assert torch.allclose(P @ torch.diag(s) @ R.T, A, atol=1e-12)
    idx = P.abs().argmax(0)
    assert (P[idx, torch.arange(5)] > 0).all()
    P2, s2, R2 = sign_fixed_svd(-A)  # same singular vectors up to the pair sign: fixed identically
    assert torch.allclose(P2, P, atol=1e-12) and torch.allclose(R2, -R, atol=1e-12)


def test_padded_svds_are_the_svds_of_each_matrix_in_one_call(monkeypatch):
    """Square, tall, wide, rank-deficient and zero matrices, with and without right vectors, in
    one SVD call: each gets its own SVD — the singular vectors of zero singular values too stay
    orthonormal inside the matrix's own coordinates."""
    torch.manual_seed(0)
    deficient = torch.randn(6, 2, dtype=f64) @ torch.randn(2, 6, dtype=f64)
    mats = [torch.randn(8, 8, dtype=f64), torch.randn(5, 5, dtype=f64), deficient, torch.zeros(3, 3, dtype=f64),
            torch.randn(6, 4, dtype=f64), torch.randn(7, 5, dtype=f64),
            torch.randn(7, 2, dtype=f64) @ torch.randn(2, 4, dtype=f64),  # rank-deficient, tall and wide
            torch.randn(3, 1, dtype=f64) @ torch.randn(1, 6, dtype=f64),
            torch.randn(3, 7, dtype=f64),
            torch.randn(4, 9, dtype=f64), torch.randn(6, 2, dtype=f64) @ torch.randn(2, 5, dtype=f64)]
    right = [True] * 8 + [False] * 3
    calls = []
    svd = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda A, **kw: calls.append(A.shape) or svd(A, **kw))
    out = padded_svds(mats, right)
    assert len(calls) == 1
    monkeypatch.setattr(torch.linalg, "svd", svd)
    for A, (P, s, R), r in zip(mats, out, right):
        k = min(A.shape)
        P0, s0, R0 = sign_fixed_svd(A)
        assert P.shape == (A.shape[0], k) and s.shape == (k,)
        assert torch.allclose(s, s0, atol=1e-12)
        assert torch.allclose(P.T @ P, torch.eye(k, dtype=f64), atol=1e-12)
        nonzero = s0 > 1e-10 * max(s0.max().item(), 1.0)
        assert torch.allclose(P[:, nonzero], P0[:, nonzero], atol=1e-10)  # the same sign convention
        if r:
            assert torch.allclose(R.T @ R, torch.eye(k, dtype=f64), atol=1e-12)
            assert torch.allclose((P * s) @ R.T, A, atol=1e-12)
            assert torch.allclose(R[:, nonzero], R0[:, nonzero], atol=1e-10)
        else:
            assert R is None
            assert torch.allclose(A @ A.T @ P, P * s.square(), atol=1e-10)


def test_truncate_keeps_the_leading_pairs():
    P0 = orthonormal(6, 6)
    R0 = orthonormal(6, 6)
    sigma = torch.tensor([5.0, 3.0, 1.0, 1e-3, 1e-4, 0.0], dtype=f64)
    A = P0 @ torch.diag(sigma) @ R0.T
    P1, s1, R1 = truncate(A, tau=0.01)
    assert s1.shape == (3,)
    assert torch.allclose(s1, sigma[:3], atol=1e-12)
    best = P0[:, :3] @ torch.diag(sigma[:3]) @ R0[:, :3].T
    assert torch.allclose(P1 @ torch.diag(s1) @ R1.T, best, atol=1e-12)


def test_moment_rotations():
    M, Q = torch.randn(6, 5, dtype=f64), torch.rand(6, 5, dtype=f64)
    P1, R1 = orthonormal(6, 3), orthonormal(5, 3)
    assert torch.allclose(rotate_first_moment(M, P1, R1), P1.T @ M @ R1)
    paper = rotate_second_moment(Q, P1, R1, "paper")
    assert torch.allclose(paper, (P1.T @ Q.sqrt() @ R1) ** 2)
    squared = rotate_second_moment(Q, P1, R1, "squared")
    expected = torch.einsum("ai,bj,ab->ij", P1**2, R1**2, Q)
    assert torch.allclose(squared, expected)
    assert (paper >= 0).all() and (squared >= 0).all()
    # identity rotation leaves both unchanged
    I6, I5 = torch.eye(6, dtype=f64), torch.eye(5, dtype=f64)
    assert torch.allclose(rotate_second_moment(Q, I6, I5, "paper"), Q)
    assert torch.allclose(rotate_second_moment(Q, I6, I5, "squared"), Q)
    with pytest.raises(ValueError, match="second_moment"):
        rotate_second_moment(Q, P1, R1, "cubic")


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("cond", [1.0, 1e3, 1e8, 1e14])
def test_augment_basis_stays_orthonormal_for_ill_conditioned_gradients(dtype, tol, cond):
    """Well-conditioned gradients take the Cholesky-QR path on the CPU, ill-conditioned ones
    fall back to Householder: both give an orthonormal extension orthogonal to U."""
    n, r = 300, 10
    U = orthonormal(n, r).to(dtype)
    sigma = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), r, dtype=f64)
    G = (orthonormal(n, r) @ torch.diag(sigma) @ orthonormal(r, r).T).to(dtype)
    Ut = augment_basis(U, G)
    Uh = torch.cat([U, Ut], 1).double()
    assert torch.isfinite(Ut).all()
    assert (Uh.T @ Uh - torch.eye(2 * r, dtype=f64)).abs().max() < tol
    # the leading directions of G are inside the augmented span
    lead = G[:, :1].double()
    assert (lead - Uh @ (Uh.T @ lead)).norm() < 10 * tol * lead.norm()


def test_batched_svd_and_ranks_match_the_single_ones():
    from lrc.linalg import clip_rank, untruncated_rank

    A = torch.randn(3, 6, 5, dtype=f64)
    P, s, R = sign_fixed_svd(A)
    for i in range(3):
        Pi, si, Ri = sign_fixed_svd(A[i])
        assert torch.allclose(P[i], Pi, atol=1e-12) and torch.allclose(s[i], si) and torch.allclose(R[i], Ri, atol=1e-12)
    sigma = torch.tensor([[4.0, 2.0, 1.0, 0.5], [4.0, 2.0, 1.0, 0.5]], dtype=f64)
    assert untruncated_rank(sigma, torch.tensor([0.25, 0.5])).tolist() == [2, 1]
    assert clip_rank(1, 4, min_rank=2) == 2 and clip_rank(4, 4, max_rank=3) == 3 and clip_rank(2, 1) == 1


# ---- the sync-free augmentation (augmentation="sync_free"; no host read, no QR) ------------------
def _checked(U, G):
    return augment_basis(U, G, sync_free=False)


@pytest.mark.parametrize("n, r", [(50, 6), (300, 10), (20, 5)])
@pytest.mark.parametrize("cond", [1.0, 1e3, 1e6])
def test_sync_free_augmentation_equals_the_checked_one_in_float64(n, r, cond):
    """Where the gradient's singular values lie within ~√(10·√n·ε) of their root mean square,
    the sync-free CholeskyQR2 is the checked one (and Householder's) to rounding."""
    torch.manual_seed(0)
    U = orthonormal(n, r)
    sigma = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), r, dtype=f64)
    G = orthonormal(n, r) @ torch.diag(sigma) @ orthonormal(r, r).T
    assert (augment_basis(U, G, sync_free=True) - _checked(U, G)).abs().max() < 1e-10 * cond


def test_sync_free_augmentation_resolves_weak_directions_in_float32():
    """A float32 gradient whose singular values fall to 1e-6 of the largest: every direction of it down to
    1e-4 of the largest lies in the new span, as with the checked path (a Householder QR here). With its
    Gram in float32 the sync-free path filled everything below ~6e-3 of the RMS singular value with random
    directions (distances 0.3–0.99 from 1e-3 down), which cost 1.2 points on digits-mlp."""
    torch.manual_seed(0)
    n, r = 2048, 64
    U = orthonormal(n, r)
    G = (torch.randn(n, r, dtype=f64) @ torch.diag(torch.logspace(0, -6, r, dtype=f64)) @ orthonormal(r, r)).float()
    P = G.double() - U @ (U.T @ G.double())
    directions, sigma, _ = torch.linalg.svd(P, full_matrices=False)
    strong = directions[:, sigma >= 1e-4 * sigma[0]]
    for sync_free in (True, False):
        Ut = augment_basis(U.float(), G, sync_free=sync_free).double()
        outside = strong - Ut @ (Ut.T @ strong)
        assert torch.linalg.vector_norm(outside, dim=0).max() < 3e-3, sync_free


def test_subspace_orthonormalization_is_the_same_on_the_cpu_and_elsewhere():
    """The subspace truncation orthonormalizes by a Householder QR on the CPU and by the sync-free CholeskyQR2
    on accelerators: the same columns (R's diagonal ≥ 0) to rounding, the masked ones zero in both."""
    from lrc.linalg import _cholesky_qr2_repaired, _orthonormal_columns

    torch.manual_seed(0)
    keep = (torch.arange(8) < torch.tensor([[8], [5]])).to(f64)
    A = torch.randn(2, 30, 8, dtype=f64) * keep[:, None, :]
    cpu = _orthonormal_columns(A, keep)
    assert (cpu - _cholesky_qr2_repaired(A.new_zeros(30, 0), A, keep)).abs().max() < 1e-12
    assert (cpu[1, :, 5:] == 0).all()


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_masked_augmentation_is_the_active_part_alone(dtype, tol):
    """A basis held at a capacity (zero columns where the mask is 0, as G = ∇W V then has): the active
    new directions are those of the active part alone, the masked ones exactly zero."""
    torch.manual_seed(0)
    n, C, r = 60, 10, 6
    U, G = orthonormal(n, r).to(dtype), torch.randn(n, r, dtype=dtype)
    mask = (torch.arange(C) < r).to(dtype)
    pad = lambda A: torch.cat([A, A.new_zeros(n, C - r)], 1)  # noqa: E731
    held = augment_basis(pad(U), pad(G), mask=mask)
    assert held.shape == (n, C) and (held[:, r:] == 0).all()
    assert (held[:, :r] - augment_basis(U, G, sync_free=True)).abs().max() < tol
    with pytest.raises(ValueError, match="2·10 ≤ 15"):
        augment_basis(pad(U)[:15], pad(G)[:15], mask=mask)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 5e-6)])
@pytest.mark.parametrize("G_kind", ["zero", "rank1", "in_span", "scaled_copies", "huge", "tiny"])
def test_sync_free_augmentation_is_orthonormal_for_degenerate_gradients(dtype, tol, G_kind):
    """No check, no fallback: a zero, rank-one, in-span or badly scaled gradient still gives
    orthonormal directions orthogonal to U, never a NaN, and its span stays inside."""
    torch.manual_seed(0)
    n, r = 200, 8
    U = orthonormal(n, r).to(dtype)
    g = torch.randn(n, 1, dtype=f64)
    G = {"zero": torch.zeros(n, r, dtype=f64),
         "rank1": g @ torch.randn(1, r, dtype=f64),
         "in_span": U.double() @ torch.randn(r, r, dtype=f64),
         "scaled_copies": g @ torch.logspace(-3, 3, r, dtype=f64)[None],  # a column 1e6× the first
         "huge": 1e30 * torch.randn(n, r, dtype=f64),
         "tiny": 1e-30 * torch.randn(n, r, dtype=f64)}[G_kind].to(dtype)
    Ut = augment_basis(U, G, sync_free=True)
    assert Ut.shape == (n, r) and torch.isfinite(Ut).all()
    Uh = torch.cat([U, Ut], 1).double()
    assert (Uh.T @ Uh - torch.eye(2 * r, dtype=f64)).abs().max() < tol
    Gd = G.double()
    assert (Gd - Uh @ (Uh.T @ Gd)).norm() <= 10 * tol * Gd.norm()


def test_sync_free_augmentation_reads_nothing_on_the_host_and_passes_nan_on(host_reads):
    U = orthonormal(100, 6).float()
    for G in (torch.randn(100, 6), torch.zeros(100, 6), torch.ones(100, 6)):
        augment_basis(U, G, sync_free=True)  # the filler is made once per shape
        with host_reads() as reads:
            augment_basis(U, G, sync_free=True)
        assert reads == []
        with host_reads() as reads:
            augment_basis(U, G, sync_free=False)  # the checked path reads (its checks)
        assert len(reads) > 0
    G = torch.randn(100, 6)
    G[3, 2] = float("nan")
    assert torch.isnan(augment_basis(U, G, sync_free=True)).any()  # not hidden, not an exception


def test_sync_free_filler_is_fixed_whatever_width_it_was_made_at():
    from lrc import linalg

    linalg._fillers.clear()
    narrow = linalg._filler(40, 5, torch.float64, torch.device("cpu")).clone()
    linalg._fillers.clear()
    linalg._filler(40, 30, torch.float64, torch.device("cpu"))
    assert torch.allclose(linalg._filler(40, 5, torch.float64, torch.device("cpu")), narrow, atol=1e-12)


@pytest.mark.parametrize("how", ["checked", "sync_free", "masked"])
def test_a_batch_of_bases_augments_as_each_alone(how):
    """augment_basis on a batch (mode="parallel" augments the matrix layers of one shape together) gives
    each matrix what it gives alone — in the checked path also when one matrix of the batch fails the
    CholeskyQR2 check (a rank-deficient gradient) and takes the Householder QR while the others do not."""
    torch.manual_seed(0)
    U = torch.stack([orthonormal(30, 4) for _ in range(3)])
    G = torch.randn(3, 30, 4, dtype=torch.float64)
    G[1, :, 3] = G[1, :, 0]  # rank-deficient: fails the check
    mask = None
    if how == "masked":
        mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.float64)
        U, G = U * mask[:, None, :], G * mask[:, None, :]
    sync_free = how != "checked"
    batch = augment_basis(U, G, sync_free=sync_free, mask=mask)
    for i in range(3):
        alone = augment_basis(U[i], G[i], sync_free=sync_free, mask=None if mask is None else mask[i])
        assert (batch[i] - alone).abs().max() < 1e-12
        active = batch[i] if mask is None else batch[i][:, mask[i] > 0]
        assert (active.mT @ active - torch.eye(active.shape[1], dtype=torch.float64)).abs().max() < 1e-12
        assert (U[i].mT @ batch[i]).abs().max() < 1e-12
