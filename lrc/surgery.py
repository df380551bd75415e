"""Model surgery: replace dense layers by factorized ones in place, and merge them back."""

from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import FACTORIZED, LoRAConv2d, LoRALinear, LowRankConv2d, LowRankLinear, TuckerConv2d
from .layers.attention import SplitMultiheadAttention, split_attention_supported
from .layers.lora import LoRAModule
from .layers.lowrank import LowRankMatrixModule, conv1d_as_linear, is_conv1d
from .layers.tucker import mode_product, unfold
from .linalg import (ALLOCATIONS, allocate_ranks, factor_parameter_count, input_whitener, left_svd, product_svd,
                     sign_fixed_svd)

__all__ = ["factorize", "densify", "compression_ratio", "count_parameters", "FactorizeReport", "LayerReport"]


@dataclass(frozen=True)
class LayerReport:
    name: str
    kind: str
    shape: tuple[int, ...]
    rank: int
    params_before: int
    params_after: int


@dataclass
class FactorizeReport:
    """What :func:`factorize` did: replaced layers, skipped layers with the reason, and
    include patterns that matched no layer."""

    replaced: list[LayerReport] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)

    @property
    def params_before(self) -> int:
        return sum(r.params_before for r in self.replaced)

    @property
    def params_after(self) -> int:
        return sum(r.params_after for r in self.replaced)

    def __str__(self) -> str:
        lines = [f"{'layer':<32} {'kind':<14} {'shape':<20} {'rank':>5} {'params':>12} {'→':^3} {'after':>10}"]
        for r in self.replaced:
            rank = "×".join(map(str, r.rank)) if isinstance(r.rank, (list, tuple)) else str(r.rank)
            lines.append(f"{r.name:<32} {r.kind:<14} {'×'.join(map(str, r.shape)):<20} {rank:>5} "
                         f"{r.params_before:>12,} {'→':^3} {r.params_after:>10,}")
        for name, why in self.skipped:
            lines.append(f"{name:<32} kept dense: {why}")
        for pattern in self.unmatched:
            lines.append(f"pattern {pattern!r} matched no layer")
        return "\n".join(lines)


KINDS = {"lowrank": (LowRankLinear, LowRankConv2d), "lora": (LoRALinear, LoRAConv2d)}
CONV_FORMATS = ("matrix", "tucker")


def _linear_candidate(module, rank, tau, adapter, kind, conv_format, svd=None):
    if type(module) is nn.Linear:
        return KINDS[kind][0].from_linear(module, rank=rank, tau=tau, adapter=adapter, svd=svd)
    if is_conv1d(module):  # Hugging Face's transposed linear map (GPT-2): factorized as the nn.Linear it is
        new = KINDS[kind][0].from_linear(conv1d_as_linear(module), rank=rank, tau=tau, adapter=adapter, svd=svd)
        new.conv1d_class = type(module)  # to_dense() gives a Conv1D again
        return new
    return None


def _dense_weight(module: nn.Module) -> Tensor:
    """A candidate's weight as ``out × in…`` (a ``Conv1D`` stores it transposed)."""
    return module.weight.detach().mT if is_conv1d(module) else module.weight.detach()


def _check_conv(module: nn.Conv2d) -> None:
    """Raise :class:`_Skip` with the reason if ``module`` cannot be factorized."""
    if module.groups != 1:
        raise _Skip(f"groups={module.groups} (grouped convolutions are not factorized)")
    if module.padding_mode != "zeros":
        raise _Skip(f"padding_mode={module.padding_mode!r}")
    if type(module) is not nn.Conv2d and not _acts_as_plain_conv(module):
        raise _Skip(f"{type(module).__name__} (an nn.Conv2d subclass) does more in its forward than the "
                    "convolution, e.g. its own padding")


def _conv_candidate(module, rank, tau, adapter, kind, conv_format, svd=None):
    if isinstance(module, nn.Conv2d):
        _check_conv(module)
        if conv_format == "tucker" and kind == "lowrank":
            if adapter:
                raise ValueError("adapter mode is for the matrix format; use conv_format='matrix'")
            return TuckerConv2d.from_conv(module, ranks=rank, tau=tau, svds=svd)
        return KINDS[kind][1].from_conv(module, rank=rank, tau=tau, adapter=adapter, svd=svd)
    return None


def _factorizable(module: nn.Module) -> bool:
    """Whether a candidate passes the checks of its kind (a convolution: ungrouped, zero-padded,
    a plain convolution)."""
    if not isinstance(module, nn.Conv2d):
        return True
    try:
        _check_conv(module)
    except _Skip:
        return False
    return True


def _acts_as_plain_conv(module: nn.Conv2d) -> bool:
    """Whether an ``nn.Conv2d`` subclass computes what ``nn.Conv2d.forward`` would, judged on a
    copy with random weights at three input sizes (odd, even; batch 1 and 2), so that its own
    padding or other extras in ``forward`` are never dropped silently. A subclass that does not
    override ``forward`` qualifies at once."""
    if type(module).forward is nn.Conv2d.forward:
        return True
    probe = copy.deepcopy(module).to_empty(device="cpu").double()
    with torch.no_grad():
        for p in probe.parameters():
            p.normal_()
        g = torch.Generator().manual_seed(0)
        k = max(probe.kernel_size)
        for batch, size in ((1, 2 * k + 3), (2, 2 * k + 6), (1, 4 * k + 1)):
            x = torch.randn(batch, probe.in_channels, size, size, generator=g, dtype=torch.float64)
            try:
                got = probe(x)
            except Exception:  # noqa: BLE001 - any failure means "not a plain convolution"
                return False
            want = nn.Conv2d.forward(probe, x)
            if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-9, atol=1e-9):
                return False
    return True


_DISPATCH: tuple[Callable, ...] = (_linear_candidate, _conv_candidate)


def _candidate(module: nn.Module) -> bool:
    return type(module) is nn.Linear or isinstance(module, nn.Conv2d) or is_conv1d(module)


class _Skip(Exception):
    pass


def factorize(model: nn.Module, rank: int | None = None, tau: float | None = None, *,
              include: Sequence[str] | None = None, exclude: Sequence[str] = (),
              adapter: bool = False, kind: str = "lowrank", ranks: dict[str, int] | None = None,
              conv_format: str = "matrix", target_cr: float | None = None,
              adapter_dropout: float = 0.0, allocation: str = "relative",
              calibration: Iterable | Tensor | None = None, calibration_samples: int = 512) -> FactorizeReport:
    """Replace ``nn.Linear`` and ``nn.Conv2d`` layers of ``model`` in place by
    :class:`~lrc.LowRankLinear` / :class:`~lrc.LowRankConv2d` (truncated-SVD initialisation);
    Hugging Face's ``Conv1D`` (GPT-2's transposed linear maps) as ``nn.Linear``, restored by
    :func:`densify`.

    Args:
        model: modified in place; new layers keep each original's device and dtype.
        rank: initial rank per layer (capped at each layer's own bound), and/or
        tau: truncation tolerance in (0, 1): the rank keeps ``‖σ_tail‖ ≤ τ‖W‖_F`` (capped by ``rank``).
        include: glob patterns on module names (``"features.*"``, ``"classifier.0"``); default: all.
        exclude: glob patterns of modules to keep dense (e.g. the first conv and the head).
        adapter: keep the dense weights frozen and add a trainable ``U S Vᵀ`` (``S = 0``).
        adapter_dropout: with ``adapter``, dropout on the adapters' input while training (LoRA's
            ``lora_dropout``); the frozen path sees the undropped input.
        kind: ``"lowrank"`` (``U S Vᵀ``, for the geometric optimizers) or ``"lora"``
            (``A Bᵀ``, for plain optimizers: the fixed-rank baseline).
        ranks: per-layer ranks by module name, overriding ``rank`` (e.g. to match a budget).
        conv_format: ``"matrix"`` (the kernel as ``out × (in·kh·kw)``, ``U S Vᵀ``) or
            ``"tucker"`` (:class:`~lrc.layers.TuckerConv2d`, ``rank`` per channel mode; the
            paper's format for VGG); LoRA layers are always matrices.
        target_cr: a compression ratio in percent (over all parameters of the model, against
            the dense model): the ranks of all layers are chosen together under one parameter
            budget over the singular values of the dense weights
            (:func:`~lrc.linalg.allocate_ranks` by ``allocation``), in place of ``tau``;
            ``rank``, if given, caps every layer.
        allocation: with ``target_cr``, how the budget is shared (:func:`~lrc.linalg.allocate_ranks`):
            ``"relative"`` (one threshold on every layer's relative singular values) or
            ``"per-parameter"`` (relative energy per parameter).
        calibration: inputs of the model (a tensor batch, or an iterable of batches or of
            ``(inputs, labels)`` pairs such as a DataLoader): the truncation keeps what matters for
            the inputs each layer sees rather than for the weight alone — the rank-``r`` ``Ŵ``
            closest to ``W`` on those inputs, ``[W L]_r L⁻¹`` with ``L Lᵀ`` the second moment of
            the layer's inputs (patches for a matrix convolution, channels for a Tucker core's input
            mode); ``tau`` and ``target_cr`` then weigh singular values of ``W L``. ``None``: the
            plain truncated SVD of the weights.
        calibration_samples: how many samples of ``calibration`` to run through the model.

    Layers whose factorization would not save parameters are kept dense (unless
    ``adapter``); the report says which and why.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"factorize takes the model (an nn.Module), got {type(model).__name__}")
    if rank is None and tau is None and not ranks and target_cr is None:
        raise ValueError("factorize needs a rank, a tolerance tau, or both (or a target_cr)")
    if target_cr is not None:
        if isinstance(target_cr, bool) or not isinstance(target_cr, (int, float)) or not 0.0 < target_cr < 100.0:
            raise ValueError(f"target_cr must be a compression ratio in percent, in (0, 100), got {target_cr!r}")
        if tau is not None or ranks:
            raise ValueError("give target_cr or tau/ranks, not both: target_cr chooses every layer's rank")
        if adapter:
            raise ValueError("target_cr sets the size of a compressed model; adapters keep their dense weights")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if conv_format not in CONV_FORMATS:
        raise ValueError(f"conv_format must be one of {', '.join(CONV_FORMATS)}, got {conv_format!r}")
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if tau is not None and not 0.0 < tau < 1.0:
        raise ValueError(f"tau must lie in (0, 1), got {tau!r}")
    if not 0.0 <= adapter_dropout < 1.0:
        raise ValueError(f"adapter_dropout must lie in [0, 1), got {adapter_dropout!r}")
    if adapter_dropout and not adapter:
        raise ValueError("adapter_dropout is for adapter=True")
    if calibration is not None and adapter:
        raise ValueError("calibration chooses how to truncate pretrained weights; adapters start at zero")
    if not isinstance(calibration_samples, int) or isinstance(calibration_samples, bool) or calibration_samples < 1:
        raise ValueError(f"calibration_samples must be a positive integer, got {calibration_samples!r}")
    report = FactorizeReport()
    matched: set[str] = set()
    split = _split_attention(model, include, exclude, report)
    targets = []
    for name, module in model.named_modules():
        if not name or not _candidate(module):
            continue
        if include is not None:
            parent = name.rpartition(".")[0]
            hits = [p for p in include if fnmatch.fnmatchcase(name, p)
                    or (parent in split and fnmatch.fnmatchcase(parent, p))]
            if not hits:
                continue
            matched.update(hits)
        if any(fnmatch.fnmatchcase(name, p) for p in exclude):
            report.skipped.append((name, "excluded"))
            continue
        targets.append((name, module))
    if include is not None:
        report.unmatched = [p for p in include if p not in matched]

    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got {allocation!r}")
    whiteners: dict[str, Tensor] = {}
    if calibration is not None:
        channels = conv_format == "tucker" and kind == "lowrank"
        grams = input_grams(model, {name: module for name, module in targets if _factorizable(module)},
                            calibration, calibration_samples, channels)
        whiteners = {name: L for name, gram in grams.items() if (L := input_whitener(gram)) is not None}
    # the candidates as the truncation sees them: weights times their inputs' whitener
    seen = [(name, _whitened(module, whiteners[name], conv_format, kind) if name in whiteners else module)
            for name, module in targets]
    svds: dict = {}  # the SVDs the budget took, reused to build the layers (within a memory allowance)
    if target_cr is not None:
        ranks = _budget_ranks(model, seen, target_cr, rank, kind, conv_format, allocation, svds)
    for (name, module), (_, source) in zip(targets, seen):
        weight = _dense_weight(module)
        n, m = weight.shape[0], weight.numel() // weight.shape[0]
        wanted = ranks.get(name, rank) if ranks else rank
        layer_rank = wanted if wanted is None or isinstance(wanted, tuple) else min(wanted, n, m)
        try:
            svd = svds.pop(name, None)
            new = next(x for x in (d(source, layer_rank, tau, adapter, kind, conv_format, svd) for d in _DISPATCH)
                       if x is not None)
        except _Skip as why:
            report.skipped.append((name, str(why)))
            continue
        if name in whiteners:
            _unwhiten(new, whiteners[name])
        before = sum(p.numel() for p in module.parameters())
        after = sum(p.numel() for p in new.parameters())
        if after >= before and not adapter:
            what = f"ranks {new.rank}" if isinstance(new.rank, list) else f"rank {new.rank}"
            report.skipped.append((name, f"{what} would not save parameters ({after:,} ≥ {before:,})"))
            continue
        if adapter_dropout:
            new.adapter_dropout = float(adapter_dropout)
        replace_module(model, name, new)
        report.replaced.append(LayerReport(name, type(new).__name__, tuple(weight.shape), new.rank, before, after))
    return report


def input_grams(model: nn.Module, modules: dict[str, nn.Module], calibration, samples: int,
                channels: bool = False) -> dict[str, Tensor]:
    """``Σ x xᵀ`` (float64) of the inputs each of ``modules`` (by name) receives while ``model``
    runs on up to ``samples`` samples of ``calibration`` (a batch, or an iterable of batches or
    of ``(inputs, labels)``): for a linear map its input vectors, for a convolution its input
    patches (``in·kh·kw``) or, with ``channels``, its input channels at every pixel."""
    grams: dict[str, Tensor] = {}

    def hook(name):
        def record(module, args, _):
            x = args[0].detach()
            if isinstance(module, nn.Conv2d):
                if channels:
                    rows = [x.movedim(1, -1).reshape(-1, x.shape[1])]
                else:  # patches in the order of weight.reshape(out, -1), a few samples at a time
                    rows = [F.unfold(part, module.kernel_size, module.dilation, module.padding, module.stride)
                            .transpose(1, 2).reshape(-1, x.shape[1] * module.weight[0, 0].numel())
                            for part in x.split(8)]
            else:
                rows = [x.reshape(-1, x.shape[-1])]
            for r in rows:
                r = r.to(torch.promote_types(r.dtype, torch.float32))
                g = (r.mT @ r).double()
                grams[name] = g if name not in grams else grams[name] + g
        return record

    handles = [module.register_forward_hook(hook(name)) for name, module in modules.items()]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            seen = 0
            for batch in ([calibration] if isinstance(calibration, Tensor) else calibration):
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                x = x[: samples - seen].to(device)
                model(x)
                seen += len(x)
                if seen >= samples:
                    break
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not grams and modules:
        raise ValueError("calibration: no input reached the layers to factorize (an empty data set?)")
    return grams


def _whitened(module: nn.Module, L: Tensor, conv_format: str, kind: str) -> nn.Module:
    """A copy of ``module`` whose weight is ``W L`` (``L`` acting on the input side: the
    flattened patch of a matrix convolution, the input channels of a Tucker core)."""
    new = copy.deepcopy(module)
    W = _dense_weight(module).double()
    if isinstance(module, nn.Conv2d) and conv_format == "tucker" and kind == "lowrank":
        Wl = torch.einsum("oihw,ij->ojhw", W, L.to(W.device))
    else:
        Wl = (W.reshape(W.shape[0], -1) @ L.to(W.device)).reshape(W.shape)
    with torch.no_grad():
        new.weight.copy_(Wl.mT if is_conv1d(module) else Wl)
    return new


@torch.no_grad()
def _unwhiten(new: nn.Module, L: Tensor) -> None:
    """Turn the factors of ``W L``'s truncation (``new``) into those of ``Ŵ = [W L]_r L⁻¹``: the
    input-side factor ``Y`` becomes ``L⁻ᵀ Y``, then orthonormal again (a matrix layer gets the
    exact SVD of its product, so ``S`` is diagonal as after a plain truncation)."""
    def solve(Y):  # L⁻ᵀ Y
        return torch.linalg.solve_triangular(L.mT.to(Y.device), Y.double(), upper=True)

    if isinstance(new, TuckerConv2d):
        U_out, core, U_in = new.factor_parameters()
        Q, R = torch.linalg.qr(solve(U_in))
        new.set_factors(U_out.detach().clone(), mode_product(core.double(), R, 1).to(core.dtype), Q.to(U_in.dtype))
    elif isinstance(new, LoRAModule):
        U, sigma, V = product_svd(new.A.double(), solve(new.B))
        root = sigma.sqrt()
        new.A.copy_(U * root)
        new.B.copy_(V * root)
    elif isinstance(new, LowRankMatrixModule):
        U, S, V = new.factor_parameters()
        U2, sigma, V2 = product_svd(U.double() @ S.double(), solve(V))
        new.set_factors(U2.to(U.dtype), torch.diag(sigma).to(S.dtype), V2.to(V.dtype))


def _budget_ranks(model: nn.Module, targets: list, target_cr: float, rank: int | None, kind: str,
                  conv_format: str, allocation: str = "relative",
                  keep: dict | None = None) -> dict[str, int | tuple[int, int]]:
    """Ranks of the layers in ``targets`` that make the model's c.r. ``target_cr``: one budget,
    allocated over the spectra of their dense weights (Tucker: of both channel-mode unfoldings).
    Each layer is capped where its factors would stop saving parameters. ``keep``: filled with
    each layer's sign-fixed SVD(s) (by name) for the construction to reuse, as long as all of them
    hold no more numbers than twice the weights (a thin SVD holds at most that) and 2²⁸ (1 GiB in
    float32); the other layers get singular values only, and their construction its own SVD."""
    allowance = min(2 * sum(_dense_weight(module).numel() for _, module in targets), 2 ** 28) if keep is not None else 0
    names, shapes, spectra, caps = [], [], [], []
    for name, module in targets:
        if isinstance(module, nn.Conv2d):
            try:
                _check_conv(module)
            except _Skip:
                continue  # kept dense: the main loop reports why
        W = _dense_weight(module)
        W = W.to(torch.promote_types(W.dtype, torch.float32))
        n, m = W.shape[0], W[0].numel()
        if isinstance(module, nn.Conv2d) and conv_format == "tucker" and kind == "lowrank":
            shape = (W.shape[0], W.shape[1], W[0, 0].numel())
            size = W.shape[0] ** 2 + W.shape[1] ** 2  # the two left bases
            if size <= allowance:
                allowance -= size
                keep[name] = [left_svd(unfold(W, mode)) for mode in (0, 1)]
                modes = [sigma for _, sigma in keep[name]]
            else:
                modes = [torch.linalg.svdvals(unfold(W, mode)) for mode in (0, 1)]
            bounds = [min(shape[0], rank or shape[0]), min(shape[1], rank or shape[1])]
            while bounds[0] > 1 and factor_parameter_count(shape, bounds) >= n * m:  # shrink both alike
                bounds = [max(1, b - max(1, round(b / max(bounds)))) for b in bounds]
        else:
            shape = (n, m)
            size = (n + m) * min(n, m)
            if size <= allowance:
                allowance -= size
                keep[name] = sign_fixed_svd(W.reshape(n, m))
                modes = [keep[name][1]]
            else:
                modes = [torch.linalg.svdvals(W.reshape(n, m))]
            bounds = [min(n, m, rank or n)]
            while bounds[0] > 1 and factor_parameter_count(shape, bounds, kind) >= n * m:
                bounds[0] -= 1
        names.append(name)
        shapes.append(shape)
        spectra.append([v.double().tolist() for v in modes])
        caps.append(tuple(bounds))
    if not names:
        return {}
    weights = sum(dict(targets)[name].weight.numel() for name in names)
    total = dense_parameters(model)
    fixed = count_parameters(model) - weights
    budget = int((1.0 - target_cr / 100.0) * total) - fixed
    floors = [tuple(1 for _ in c) for c in caps]
    cost = lambda i, r: factor_parameter_count(shapes[i], r, kind)  # noqa: E731
    least = sum(cost(i, f) for i, f in enumerate(floors))
    if budget < least:
        raise ValueError(f"target_cr={target_cr:g} is out of reach: the parameters kept dense (layers not "
                         f"factorized, biases, norms) and rank 1 everywhere leave at most "
                         f"{(1 - (fixed + least) / total) * 100:.1f}% c.r.; ask for less, or factorize more layers")
    chosen = allocate_ranks(spectra, cost, budget, floors, caps, allocation)
    return {name: r if len(r) == 2 else r[0] for name, r in zip(names, chosen)}


def _split_attention(model: nn.Module, include, exclude, report: FactorizeReport) -> set[str]:
    """Replace each ``nn.MultiheadAttention`` that include/exclude select (by its own name or a
    projection's, ``NAME.q_proj`` etc.) by a :class:`SplitMultiheadAttention` — the same
    function with four ``nn.Linear`` projections, which the main pass then factorizes; returns
    the names split. An attention it cannot represent is reported and kept."""
    done = set()
    for name, module in list(model.named_modules()):
        if not name or type(module) is not nn.MultiheadAttention:
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in exclude):
            report.skipped.append((name, "excluded"))
            continue
        children = [name] + [f"{name}.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")]
        if include is not None and not any(fnmatch.fnmatchcase(c, p) for p in include for c in children):
            continue
        why = split_attention_supported(module)
        if why:
            report.skipped.append((name, why))
            continue
        replace_module(model, name, SplitMultiheadAttention.from_attention(module))
        done.add(name)
    return done


def densify(model: nn.Module) -> nn.Module:
    """Replace every factorized layer of ``model`` (in place) by its dense equivalent, and every
    split attention by the ``nn.MultiheadAttention`` it came from."""
    for name, module in list(model.named_modules()):
        if name and isinstance(module, FACTORIZED):
            replace_module(model, name, module.to_dense())
    for name, module in list(model.named_modules()):
        if name and isinstance(module, SplitMultiheadAttention):
            replace_module(model, name, module.to_dense())
    return model


def count_parameters(model: nn.Module) -> int:
    """Parameters of ``model``; a layer an optimizer's ``capacity`` holds at more columns than its rank counts
    at its active rank (what it saves as, :func:`lrc.io.save_model`), not at the capacity."""
    total = sum(p.numel() for p in model.parameters())
    for module in model.modules():
        if isinstance(module, LowRankMatrixModule) and module.rank_mask is not None:
            shape = (module.out_dim, module.in_dim)
            total -= factor_parameter_count(shape, (module.rank,)) - factor_parameter_count(shape, (module.active_rank,))
    return total


def dense_parameters(model: nn.Module) -> int:
    """Parameters of ``model`` with every factorized layer counted as the dense layer it replaces."""
    total = 0
    factorized_ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, FACTORIZED):
            total += module.num_dense_parameters()
            factorized_ids.update(id(p) for p in module.parameters())
    return total + sum(p.numel() for p in model.parameters() if id(p) not in factorized_ids)


def compression_ratio(model: nn.Module) -> float:
    """``(1 − params(model) / params(dense model)) × 100``, over all parameters (the paper's c.r.)."""
    return (1.0 - count_parameters(model) / dense_parameters(model)) * 100.0


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at the dotted module path ``name`` of ``model``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)

