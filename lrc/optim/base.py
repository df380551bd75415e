"""What the geometric low-rank optimizers share: gathering factors, the three ways to get
the coefficient gradient, augmentation, truncation and carrying the state to the new bases.

A subclass supplies the update of one tensor (``_update_``), the state it needs
(``_state_keys``) and which state entries are second moments (``_second_moment_keys``).
The same ``_update_`` runs on dense parameters and on the augmented coefficient ``S̄``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ..distributed import all_reduce_mean_, broadcast_, broadcast_ints, is_distributed
from ..layers import LowRankMatrixModule, TuckerConv2d
from ..layers.lowrank import rescale_factor
from ..layers.tucker import unfold
from ..linalg import (
    ALLOCATIONS,
    SECOND_MOMENT_RULES,
    allocate_ranks,
    augment_basis,
    factor_parameter_count,
    clip_rank,
    in_channel_modes,
    mode_svds,
    pad_block,
    padded_svds,
    rotate_first_moment,
    rotate_second_moment,
    sign_fixed_svd,
    subspace_truncation,
    untruncated_rank,
)

__all__ = ["LowRankOptimizer", "MODES", "SVD_BATCHINGS", "AUGMENTATIONS", "TRUNCATIONS"]

MODES = ("fused", "two_pass", "parallel")
SVD_BATCHINGS = ("auto", "shape", "padded")
AUGMENTATIONS = ("auto", "sync_free")
TRUNCATIONS = ("svd", "subspace")
TRAINED = (LowRankMatrixModule, TuckerConv2d)  # layer kinds these optimizers train


class LowRankOptimizer(Optimizer):
    """Base class of :class:`~lrc.LowRankAdam` and :class:`~lrc.LowRankSGD`."""

    _state_keys: tuple[str, ...] = ()
    _second_moment_keys: tuple[str, ...] = ()

    def __init__(self, model: nn.Module, defaults: dict, *, mode: str, tau: float, min_rank: int,
                 max_rank: int | None, second_moment: str = "squared", project_moments: bool = True,
                 distributed: bool | None = None, update_every: int = 1,
                 target_cr: float | None = None, max_params: int | None = None,
                 allocation: str = "relative", fixed_ranks: bool = False, rank_every: int = 1,
                 svd_batching: str = "auto", basis_every: int = 1, augmentation: str = "auto",
                 capacity: int | None = None, truncation: str = "svd", capturable: bool = False,
                 new_block_fraction: float | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"{type(self).__name__} takes the model (an nn.Module), got {type(model).__name__}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not 0.0 <= tau < 1.0:
            raise ValueError(f"Invalid tau: {tau!r} (must lie in [0, 1); 0 turns truncation off)")
        if not isinstance(min_rank, int) or min_rank < 1:
            raise ValueError(f"Invalid min_rank: {min_rank!r} (must be an integer ≥ 1)")
        if max_rank is not None and (not isinstance(max_rank, int) or max_rank < min_rank):
            raise ValueError(f"Invalid max_rank: {max_rank!r} (must be an integer ≥ min_rank={min_rank})")
        if second_moment not in SECOND_MOMENT_RULES:
            raise ValueError(f"Invalid second_moment: {second_moment!r} (one of {SECOND_MOMENT_RULES})")
        if not isinstance(update_every, int) or isinstance(update_every, bool) or update_every < 1:
            raise ValueError(f"Invalid update_every: {update_every!r} (must be an integer ≥ 1)")
        if not isinstance(basis_every, int) or isinstance(basis_every, bool) or basis_every < 1:
            raise ValueError(f"Invalid basis_every: {basis_every!r} (must be an integer ≥ 1)")
        if update_every > 1 and basis_every > 1:
            raise ValueError(f"give update_every or basis_every, not both (got {update_every} and {basis_every}): "
                             "each amortises the basis update over a cycle of steps")
        if target_cr is not None and (isinstance(target_cr, bool) or not isinstance(target_cr, (int, float))
                                      or not 0.0 < target_cr < 100.0):
            raise ValueError(f"Invalid target_cr: {target_cr!r} (a compression ratio in percent, in (0, 100))")
        if max_params is not None and (isinstance(max_params, bool) or not isinstance(max_params, int)
                                       or max_params < 1):
            raise ValueError(f"Invalid max_params: {max_params!r} (a number of parameters ≥ 1)")
        if target_cr is not None and max_params is not None:
            raise ValueError("give target_cr or max_params, not both: each sets the budget")
        if allocation not in ALLOCATIONS:
            raise ValueError(f"Invalid allocation: {allocation!r} (one of {ALLOCATIONS})")
        if not isinstance(fixed_ranks, bool):
            raise ValueError(f"Invalid fixed_ranks: {fixed_ranks!r} (True or False)")
        if not isinstance(rank_every, int) or isinstance(rank_every, bool) or rank_every < 1:
            raise ValueError(f"Invalid rank_every: {rank_every!r} (must be an integer ≥ 1)")
        if svd_batching not in SVD_BATCHINGS:
            raise ValueError(f"Invalid svd_batching: {svd_batching!r} (one of {SVD_BATCHINGS})")
        if augmentation not in AUGMENTATIONS:
            raise ValueError(f"Invalid augmentation: {augmentation!r} (one of {AUGMENTATIONS})")
        if capacity is not None:
            if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < min_rank:
                raise ValueError(f"Invalid capacity: {capacity!r} (an integer ≥ min_rank={min_rank})")
            for name, value, why in (("update_every", update_every > 1, "its cycles hold the augmented bases"),
                                     ("target_cr/max_params", target_cr is not None or max_params is not None,
                                      "a budget is shared out on the host"),
                                     ("project_moments=False", not project_moments,
                                      "the naive baseline cuts moments by position")):
                if value:
                    raise ValueError(f"capacity does not go with {name}: {why}; leave one of them out")
            max_rank = capacity if max_rank is None else min(max_rank, capacity)
        if truncation not in TRUNCATIONS:
            raise ValueError(f"Invalid truncation: {truncation!r} (one of {TRUNCATIONS})")
        if truncation == "subspace" and update_every > 1:
            raise ValueError("truncation='subspace' does not go with update_every > 1: leave one of them out")
        if not isinstance(capturable, bool):
            raise ValueError(f"Invalid capturable: {capturable!r} (True or False)")
        if capturable:
            missing = [name for name, ok in (("capacity=C", capacity is not None),
                                             ("augmentation='sync_free'", augmentation == "sync_free"),
                                             ("truncation='subspace'", truncation == "subspace")) if not ok]
            if missing:
                raise ValueError(f"capturable=True needs {', '.join(missing)} too: a captured step may neither read "
                                 "the device nor change a shape")
            if mode == "two_pass":
                raise ValueError("capturable=True does not go with mode='two_pass' (its second pass resizes the "
                                 "layers): use 'fused' or 'parallel'")
            if update_every > 1 or basis_every > 1:
                raise ValueError("capturable=True does not go with update_every or basis_every > 1: their cycles "
                                 "alternate two kinds of step; leave one of them out")
        if new_block_fraction is None:  # the mode's own: fused and two_pass exact, parallel without the block
            new_block_fraction = 0.0 if mode == "parallel" else 1.0
        if (isinstance(new_block_fraction, bool) or not isinstance(new_block_fraction, (int, float))
                or not 0.0 <= new_block_fraction <= 1.0):
            raise ValueError(f"Invalid new_block_fraction: {new_block_fraction!r} (a share of the batch in [0, 1]; "
                             "1: the exact new-new block)")
        if mode == "two_pass" and new_block_fraction != 1.0:
            raise ValueError("new_block_fraction does not go with mode='two_pass', whose second pass forms the "
                             "new-new block exactly: use mode='parallel' (or 'fused') to estimate it")
        if mode == "fused" and new_block_fraction == 0.0:
            raise ValueError("new_block_fraction=0 drops the new-new block, which is mode='parallel': use that "
                             "(it also augments the layers of one shape together)")
        self.new_block_fraction = float(new_block_fraction)
        self.capturable = capturable
        self.truncation = truncation
        self.capacity = capacity
        self.augmentation = augmentation
        self.rank_every = rank_every
        self.svd_batching = svd_batching
        self.allocation = allocation
        self.fixed_ranks = fixed_ranks
        self.mode = mode
        self.update_every = update_every
        self.basis_every = basis_every
        self._cycle = max(update_every, basis_every)  # steps per basis update (one of the two is 1)
        # carry the moments of the directions a truncation cut, to be projected onto the next
        # augmentation (set by a subclass option, e.g. LowRankAdam(new_moments="project"))
        self.carry_moments = False
        self.second_moment = second_moment
        self.project_moments = project_moments
        self.distributed = is_distributed() if distributed is None else distributed
        self.bytes_communicated = 0  # payload this process all-reduced in the last step
        # per layer, summed over steps on the device (read by pop_diagnostics, never in step()):
        # ‖ΔW‖_F of the coefficient step, RMS sine of the basis rotation, relative energy the
        # truncation removed, its maximum, and the number of steps
        self._diagnostics: dict = {}
        self._layers: dict[Tensor, LowRankMatrixModule | TuckerConv2d] = {}  # S (core) -> its layer
        factor_ids: set[int] = set()
        for module in model.modules():
            if isinstance(module, TuckerConv2d):
                module.keep_mode_grads = mode == "parallel"
            if isinstance(module, TRAINED):
                self._layers[module.S] = module
                factor_ids.update(id(p) for p in module.factor_parameters())
                module.fused = mode == "fused"
                module.sync_free_augmentation = augmentation == "sync_free"  # augment_basis(sync_free=…)
                module.new_block_fraction = self.new_block_fraction if mode != "two_pass" else 1.0
                module.keep_new_block = mode == "parallel" and self.new_block_fraction > 0
                module.distributed = self.distributed and mode == "fused"
                module.clear_fused_grads()
        self._bases = dict.fromkeys(p for layer in self._layers.values() for p in (layer.U, layer.V))  # a set (by identity)
        # the layers held at ``capacity`` columns from their first truncation on: matrix layers with room for
        # the augmentation of a full capacity (2·capacity ≤ min(n, m)); the others change shape as without it
        self._held = set() if capacity is None else {
            layer for layer in self._layers.values()
            if not isinstance(layer, TuckerConv2d) and 2 * capacity <= min(layer.out_dim, layer.in_dim)}
        if capacity is not None:
            names = {module: name for name, module in model.named_modules()}
            for layer in self._layers.values():
                if max(_ranks_of(layer)) > capacity:
                    raise ValueError(f"capacity={capacity} is below the rank {max(_ranks_of(layer))} of layer "
                                     f"{names.get(layer, '?')}: give a capacity ≥ the largest rank, or factorize at "
                                     "lower ranks")
            if capturable:
                for layer in self._layers.values():
                    if layer not in self._held:
                        raise ValueError(
                            f"capturable=True needs every factorized layer held at the capacity, but layer "
                            f"{names.get(layer, '?')} cannot be (a Tucker core, or a matrix with min(n, m) < "
                            f"2·capacity = {2 * capacity}): exclude it from factorize or lower the capacity")
        lowrank = [p for layer in self._layers.values() for p in layer.factor_parameters()]
        dense = [p for p in model.parameters() if p.requires_grad and id(p) not in factor_ids]
        groups = [g for g in ({"params": lowrank}, {"params": dense}) if g["params"]]
        if not groups:
            raise ValueError("the model has no trainable parameters")
        # phase: the step's place in a basis-update cycle of ``update_every`` steps; truncations:
        # how many truncations so far (``rank_every``) — kept in the groups so that they travel
        # with state_dict()
        # capturable: torch.optim's load_state_dict then puts the step counters on the parameters' device
        super().__init__(groups, dict(defaults, tau=tau, min_rank=min_rank, max_rank=max_rank, phase=0,
                                      truncations=0, capturable=capturable))
        if capturable:
            self._lr_on_device()
        elif any(isinstance(group["lr"], Tensor) for group in self.param_groups):
            raise ValueError("lr as a tensor needs capturable=True (give a number otherwise)")
        self.target_cr = target_cr
        self.budget = None if target_cr is None else self._budget(model, target_cr, min_rank)
        if max_params is not None:
            floor = self._least_params(min_rank)
            if max_params < floor:
                raise ValueError(f"max_params={max_params:,} is below the {floor:,} parameters the factors hold at "
                                 f"rank {min_rank}")
            self.budget = max_params

    def _lr_on_device(self) -> None:
        """capturable: each group's ``lr`` a 0-d tensor on its parameters' device (in their dtype, at least
        float32), which a captured step reads there and a scheduler updates in place (``fill_``)."""
        for group in self.param_groups:
            like = group["params"][0]
            dtype, value = torch.promote_types(like.dtype, torch.float32), group["lr"]
            if not (isinstance(value, Tensor) and value.device == like.device and value.dtype == dtype):
                group["lr"] = torch.tensor(float(value), dtype=dtype, device=like.device)

    def _new_step(self, like: Tensor) -> Tensor:
        """A fresh step counter: on the CPU, as torch.optim's (reading it never waits for a device); with
        ``capturable``, on ``like``'s device, where a captured step counts on replay."""
        return torch.zeros((), dtype=torch.float32, device=like.device) if self.capturable else torch.tensor(0.0)

    def _least_params(self, min_rank: int) -> int:
        """Parameters the factors of all trained layers hold at rank ``min_rank``."""
        return sum(_layer_cost(layer, tuple(min(min_rank, s) for s in _rank_bounds(layer)))
                   for layer in self._layers.values())

    def _budget(self, model: nn.Module, target_cr: float, min_rank: int) -> int:
        """Parameters the factors of all trained layers may hold so that the model's c.r. (over all
        its parameters, against the dense model) is ``target_cr``."""
        if any(layer.adapter for layer in self._layers.values()):
            raise ValueError("target_cr sets the size of a compressed model; adapter layers keep their dense "
                             "weights (bound an adapter's size with max_rank instead)")
        factor_ids = {id(p) for layer in self._layers.values() for p in layer.factor_parameters()}
        fixed = sum(p.numel() for p in model.parameters() if id(p) not in factor_ids)
        dense = fixed + sum(layer.num_dense_parameters() - (0 if layer.bias is None else layer.bias.numel())
                            for layer in self._layers.values())
        budget = int((1.0 - target_cr / 100.0) * dense) - fixed
        floor = self._least_params(min_rank)
        if budget < floor:
            best = (1.0 - (fixed + floor) / dense) * 100.0
            raise ValueError(f"target_cr={target_cr:g} is out of reach: the parameters outside the factors "
                             f"(layers kept dense, biases, norms) and rank {min_rank} everywhere leave at most "
                             f"{best:.1f}% c.r.; ask for less, or factorize more layers")
        return budget

    # ---- hooks for subclasses ---------------------------------------------------------
    def _update_(self, param: Tensor, grad: Tensor, state: dict, group: dict) -> None:
        raise NotImplementedError

    # ---- public -----------------------------------------------------------------------
    @property
    def layers(self) -> list[LowRankMatrixModule]:
        """The factorized layers this optimizer trains."""
        return list(self._layers.values())

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for layer in self._layers.values():
            layer.clear_fused_grads()

    def _fill_new_moments(self, padded: dict, G_S: Tensor, r_out: int, r_in: int, group: dict) -> None:
        """Hook: the moments' entries of the new directions (outside the top-left ``r_out×r_in``
        block) before the update; zero as the paper (``diag(M, 0)``) unless a subclass fills them."""

    def coefficient_lr_scale(self, layer, S_bar: Tensor) -> float:
        """Factor on ``lr`` for the coefficient step of ``layer`` (augmented to ``S_bar``);
        1 unless a subclass's step-size rule says otherwise."""
        return 1.0

    def coefficient_step_weight(self, layer, S_bar: Tensor) -> Tensor | None:
        """Entrywise weights on the step of ``layer``'s augmented coefficient ``S_bar``, or
        ``None`` (every entry as the update rule gives it) unless a subclass's rule says otherwise."""
        return None

    @torch.no_grad()
    def pop_diagnostics(self) -> dict:
        """Per factorized layer, the means over the steps since the last call: ``step_norm``
        (‖ΔW‖_F of the coefficient step, before truncation; exact, since the augmented bases are
        orthonormal), ``rotation`` (RMS sine of the principal angles between the old and the new
        bases, ``U`` and ``V`` averaged), ``truncated_energy`` (``1 − ‖S_new‖²/‖Ŝ‖²``) and its
        maximum ``truncated_energy_max``; and, from the last truncation, ``spectrum_ratio``: the
        smallest singular value it kept over the largest (a Tucker core: of the output-channel
        unfolding of ``Ĉ``) — near 1 a flat spectrum, every kept direction of about the same
        weight; near 0 a decaying one. Reads the device once; resets the sums."""
        layers = list(self._diagnostics)
        if not layers:
            return {}
        values = torch.stack([self._diagnostics[layer] for layer in layers]).double().cpu().tolist()
        self._diagnostics.clear()
        out = {}
        for layer, (dw, rot, energy, energy_max, n, spread) in zip(layers, values):
            n = max(n, 1.0)
            out[layer] = {"step_norm": dw / n, "rotation": rot / n, "truncated_energy": energy / n,
                          "truncated_energy_max": energy_max, "spectrum_ratio": spread, "steps": int(n)}
        return out

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None):
        """One step. ``closure`` (re-evaluates the model, returns the loss) is required in
        ``mode="two_pass"``, which calls it twice; otherwise it is optional. A non-finite
        gradient that makes a factorization fail raises ``FloatingPointError`` saying so."""
        try:
            return self._step(closure)
        except torch.linalg.LinAlgError as e:
            # only on this path: a finiteness check on every step would wait for the device
            if any(not torch.isfinite(p.grad).all() for group in self.param_groups for p in group["params"]
                   if p.grad is not None):
                raise FloatingPointError(
                    f"{type(self).__name__}.step(): a gradient holds NaN or inf (the loss was not finite?), so "
                    f"a factorization failed ({str(e).splitlines()[0][:120]}); the parameters may hold "
                    "non-finite values now: restore them from a checkpoint, and skip steps whose loss is not "
                    "finite (torch.amp.GradScaler does)") from None
            raise

    def _step(self, closure: Callable[[], Tensor] | None):
        loss = None
        self.bytes_communicated = 0
        phase = self.param_groups[0].get("phase", 0) % self._cycle
        if phase:  # inside a cycle (update_every or basis_every > 1): a plain step of S in the bases it holds
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            self._average_grads(with_bases=False, coefficients=True)  # no fused backward averaged S.grad
            coefficient_grads = self._coefficient_grads()
        elif self.mode == "two_pass":
            if closure is None:
                raise RuntimeError("mode='two_pass' needs a closure: opt.step(closure), where closure "
                                   "zeroes the grads, runs forward and backward and returns the loss")
            with torch.enable_grad():
                loss = closure()
            self._average_grads(with_bases=True)
            coefficient_grads = self._second_pass(closure)
        else:
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            self._average_grads(with_bases=self.mode == "parallel")
            coefficient_grads = self._fused_grads() if self.mode == "fused" else self._parallel_grads()

        if self.update_every > 1 and not phase:
            coefficient_grads = {layer: _square(layer, *grads) for layer, grads in coefficient_grads.items()}
        coefficients, dense = [], []
        for group in self.param_groups:
            for p in group["params"]:
                layer = self._layers.get(p)
                if layer is not None:
                    if layer in coefficient_grads:
                        coefficients.append((layer, *coefficient_grads[layer], group))
                elif p.grad is not None and p not in self._bases:
                    dense.append((p, group))
        pending = self._update_coefficients(coefficients)
        self._step_dense(dense)
        if phase and self.basis_every > 1:  # between basis updates: S moves, bases and ranks stay
            self._hold(pending)
        elif phase == self.update_every - 1:
            self._truncate(pending)
        else:  # the first steps of a cycle: the layers keep (take) the augmented bases
            self._keep(pending)
        for group in self.param_groups:
            group["phase"] = (phase + 1) % self._cycle
        self._sync_fused()
        for layer in self._layers.values():
            for p in layer.factor_parameters():
                p.grad = None  # consumed; shapes may have changed
            layer.clear_fused_grads()
        return loss

    def _sync_fused(self) -> None:
        """The fused backward forms the augmentation only where the next step uses it: in
        mode="fused", on the first step of a cycle (every step with ``update_every=1`` and
        ``basis_every=1``); the basis gradients ``G_K``, ``G_L`` are formed only there too (a
        step inside a cycle moves ``S`` alone: two of the backward's large products fewer)."""
        augment = not self.param_groups[0].get("phase", 0) % self._cycle
        keep = self.mode == "parallel" and self.new_block_fraction > 0 and augment
        for layer in self._layers.values():
            layer.fused = self.mode == "fused" and augment
            layer.keep_new_block = keep  # the backward keeps rows for the new-new block step() forms
            layer.basis_grads = augment
            layer.distributed = self.distributed and layer.fused

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        if self.capturable:  # a state saved without it: counters and lr onto the device
            for group in self.param_groups:
                group["capturable"] = True
                for p in group["params"]:
                    state = self.state.get(p, {})
                    if "step" in state:
                        state["step"] = state["step"].to(dtype=torch.float32, device=p.device)
            self._lr_on_device()
        self._sync_fused()  # a state saved inside a cycle resumes there
        for layer in self._layers.values():  # capacity: the masks of the layers saved held
            mask = self.state[layer.S].get("rank_mask")
            layer.rank_mask = mask if mask is not None and mask.shape[0] == layer.S.shape[0] else None

    @torch.no_grad()
    def finish_cycle(self) -> None:
        """With ``update_every > 1``: end the cycle now — truncate the augmented bases the layers
        hold (as the cycle's last step would, without a step) — so that the model has its
        truncated ranks, e.g. before an evaluation or saving it. ``lrc train`` calls it at the
        end of every epoch. Nothing to do with ``update_every=1`` or between cycles."""
        if not self.param_groups[0].get("phase", 0) % self.update_every:
            return
        pending = []
        for group in self.param_groups:
            for p in group["params"]:
                layer = self._layers.get(p)
                if layer is None:
                    continue
                U, S, V = layer.factor_parameters()
                state = self.state[S]
                if "step" not in state:  # never stepped: nothing augmented
                    continue
                padded = {"step": state["step"], **{k: state[k] for k in self._state_keys}}
                pending.append((layer, group, U.new_zeros(U.shape[0], 0), V.new_zeros(V.shape[0], 0),
                                S.detach().clone(), padded, S.new_zeros(())))
        self._truncate(pending)
        for group in self.param_groups:
            group["phase"] = 0
        self._sync_fused()

    def _average_grads(self, with_bases: bool, coefficients: bool = False) -> None:
        """Data-parallel: one all-reduce of the dense grads and, unless the fused backward
        already averaged them, of ``G_K``/``G_L`` (``U.grad``/``V.grad``); ``coefficients``:
        also of the coefficients' grads (a step without augmentation outside mode="fused")."""
        if not self.distributed:
            return
        grads = [p.grad for g in self.param_groups for p in g["params"]
                 if p.grad is not None and (p not in self._layers or coefficients)
                 and (with_bases or p not in self._bases)]
        if self.mode == "parallel":  # a Tucker layer's full mode gradients and, unless above, its core gradient
            # (the old block of its G_S, where a matrix layer's is formed from the averaged G_K) with the core
            # gradients its backward passes kept for the new-new block's rescaling, so that both stay comparable
            for layer in self._layers.values():
                if isinstance(layer, TuckerConv2d) and layer._mode_grads is not None:
                    grads += list(layer._mode_grads)
                    if not coefficients and layer.core.grad is not None:
                        grads += [layer.core.grad] + ([layer._kept_S] if layer._kept_S is not None else [])
        self.bytes_communicated += all_reduce_mean_(grads)

    # ---- the coefficient gradient G_S, three ways ----------------------------------------
    def _fused_grads(self) -> dict:
        out = {}
        for layer in self._layers.values():
            if layer._backward_count > 1:
                raise RuntimeError(
                    f"mode='fused' needs exactly one backward pass per step, but {layer._backward_count} "
                    "reached this step (gradient accumulation?). Call zero_grad() between passes, or use "
                    "mode='two_pass' or mode='parallel', which accumulate.")
            if layer._fused_grads is None or layer.S.grad is None:
                continue
            Ut, Vt, G_S = layer._fused_grads
            # Scalar rescaling of the grads after backward (clipping, loss-scale unscaling)
            # reaches G_S through its top-left block, which is S.grad as the backward wrote it.
            out[layer] = (Ut, Vt, G_S * rescale_factor(layer.S.grad, G_S[: layer.S.shape[0], : layer.S.shape[1]]))
        return out

    def _coefficient_grads(self) -> dict:
        """A step without augmentation: ``∂L/∂S`` in the bases the layer holds (no new columns)."""
        out = {}
        for layer in self._layers.values():
            U, S, V = layer.factor_parameters()
            if S.grad is not None:
                out[layer] = (U.new_zeros(U.shape[0], 0), V.new_zeros(V.shape[0], 0), S.grad)
        return out

    def _parallel_grads(self) -> dict:
        """``mode="parallel"``: the augmentations and ``G_S`` (its new-new block zero) from ``G_K``, ``G_L``.
        Matrix layers of one shape (and mask, augmentation) are augmented as one batch: one set of products
        and small factorizations for all of them instead of one per layer (the same values to rounding)."""
        out, matrices = {}, {}
        for layer in self._layers.values():
            U, _, V = layer.factor_parameters()
            if U.grad is None or V.grad is None:
                continue
            G_K, G_L = U.grad, V.grad
            if isinstance(layer, TuckerConv2d):
                Ut = augment_basis(U, G_K, None, layer.sync_free_augmentation)
                Vt = augment_basis(V, G_L, None, layer.sync_free_augmentation)
                G = layer.parallel_coefficient_grad(Ut, Vt)
                if G is not None:
                    out[layer] = (Ut, Vt, G)
                continue
            # Uᵀ G_K = Uᵀ ∇W V is the coefficient's own gradient (accumulated as G_K, G_L are; not averaged
            # over processes, which G_K is): the old block of G_S and the first projection of both
            # augmentations, as in the fused backward
            S_grad = None if self.distributed else layer.S.grad
            UtG = U.mT @ G_K if S_grad is None else S_grad.to(G_K.dtype)
            key = (tuple(U.shape), tuple(V.shape), G_K.dtype, G_K.device, layer.rank_mask is None,
                   layer.sync_free_augmentation)
            matrices.setdefault(key, []).append((layer, U.detach(), V.detach(), G_K, G_L, UtG))
        for items in matrices.values():
            layers = [item[0] for item in items]
            U, V, G_K, G_L, UtG = (_stack([item[j] for item in items]) for j in range(1, 6))
            mask = None if layers[0].rank_mask is None else _stack([layer.rank_mask for layer in layers])
            Ut = augment_basis(U, G_K, UtG, layers[0].sync_free_augmentation, mask)
            Vt = augment_basis(V, G_L, UtG.mT, layers[0].sync_free_augmentation, mask)
            r, a, b = U.shape[-1], Ut.shape[-1], Vt.shape[-1]
            G_S = UtG.new_zeros(len(layers), r + a, r + b)
            G_S[:, :r, :r] = UtG
            G_S[:, r:, :r] = Ut.mT @ G_K
            G_S[:, :r, r:] = (Vt.mT @ G_L).mT
            for j, layer in enumerate(layers):
                out[layer] = (Ut[j], Vt[j], G_S[j])
        self._fill_new_blocks(out)
        return out

    def _fill_new_blocks(self, grads: dict) -> None:
        """``mode="parallel"`` with ``new_block_fraction > 0``: each layer's new-new block ``Ũᵀ∇W Ṽ`` from what
        its backward passes kept (:meth:`~lrc.layers.LowRankMatrixModule.kept_new_block`), averaged over the
        processes (one all-reduce) — the same ``G_S`` as the fused step's with that fraction."""
        filled = []
        for layer, (Ut, Vt, G_S) in grads.items():
            if Ut.shape[1] and Vt.shape[1]:
                block = layer.kept_new_block(Ut, Vt)
                if block is not None:
                    filled.append((G_S, Ut.shape[1], Vt.shape[1], block.to(G_S.dtype)))
        if self.distributed and filled:
            self.bytes_communicated += all_reduce_mean_([item[3] for item in filled])
        for G_S, a, b, block in filled:
            G_S[-a:, -b:] = block

    def _second_pass(self, closure) -> dict:
        """The paper as written: evaluate the gradient of the coefficient at ``Û S̄ V̂ᵀ``."""
        bases, saved = {}, {}
        for layer in self._layers.values():
            U, S, V = layer.factor_parameters()
            if U.grad is None or V.grad is None:
                continue
            Ut = augment_basis(U, U.grad, sync_free=layer.sync_free_augmentation, mask=layer.rank_mask)
            Vt = augment_basis(V, V.grad, sync_free=layer.sync_free_augmentation, mask=layer.rank_mask)
            bases[layer] = (Ut, Vt)
            saved[layer] = (U.detach().clone(), S.detach().clone(), V.detach().clone())
            a, b = S.shape[0] + Ut.shape[1], S.shape[1] + Vt.shape[1]
            layer.set_factors(torch.cat([U, Ut], 1), pad_block(S, a, b), torch.cat([V, Vt], 1))
        dense_grads = {p: p.grad for group in self.param_groups for p in group["params"]
                       if p not in self._layers and p not in self._bases}
        for p in dense_grads:
            p.grad = None
        for layer in bases:  # only ∂L/∂S is needed at the augmented weights
            layer.U.requires_grad_(False)
            layer.V.requires_grad_(False)
        try:
            with torch.enable_grad():
                closure()
            if self.distributed:
                self.bytes_communicated += all_reduce_mean_([layer.S.grad for layer in bases])
            out = {layer: (*bases[layer], layer.S.grad) for layer in bases if layer.S.grad is not None}
        finally:
            for layer, factors in saved.items():
                layer.set_factors(*factors)
                layer.U.requires_grad_(True)
                layer.V.requires_grad_(True)
            for p, g in dense_grads.items():
                p.grad = g
        return out

    # ---- updates --------------------------------------------------------------------------
    def _update_many_(self, params: list[Tensor], grads: list[Tensor], states: list[dict], group: dict) -> None:
        """Hook: the update of several tensors that share ``group`` and their step count; one
        ``_update_`` each unless a subclass has a multi-tensor form (the same values)."""
        for param, grad, state in zip(params, grads, states):
            self._update_(param, grad, state, group)

    def _step_dense(self, items: list[tuple[Tensor, dict]]) -> None:
        """The dense parameters' update (``(p, group)`` pairs): those of one group, device, dtype
        and step count in one multi-tensor update."""
        batches: dict[tuple, list[Tensor]] = {}
        for p, group in items:
            state = self.state[p]
            if not state:
                state["step"] = self._new_step(p)
                for key in self._state_keys:
                    state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            # the step count lives on the CPU, as torch.optim's: reading it never waits for a device;
            # capturable: on the device, never read (each tensor takes its own count)
            count = None if self.capturable else float(state["step"])
            batches.setdefault((id(group), p.device, p.dtype, count), []).append(p)
        groups = {id(group): group for _, group in items}
        for (gid, *_), params in batches.items():
            self._update_many_(params, [p.grad for p in params], [self.state[p] for p in params], groups[gid])

    def _update_coefficients(self, items: list[tuple]) -> list[tuple]:
        """Steps 3–5 of DESIGN.md for every layer of ``items`` (``(layer, Ũ, Ṽ, G_S, group)``):
        pad ``S`` and the moments, update ``S̄``. The coefficients of one shape, step count and
        step size are updated as one stacked tensor — a few kernels for all of them instead of a
        set per layer; each entry takes exactly the value a layer-by-layer update gives it."""
        prepared = [self._prepare_coefficient(*item) for item in items]
        batches: dict[tuple, list[int]] = {}
        for i, (_, sub, _, _, S_bar, padded, _, _, rescale) in enumerate(prepared):
            count = None if self.capturable else float(padded["step"])  # capturable: a count per layer, on the device
            key = (id(sub["params"]), tuple(S_bar.shape), S_bar.dtype, S_bar.device, count,
                   sub["lr"], sub["weight_decay"], rescale is None)
            batches.setdefault(key, []).append(i)
        pending: list = [None] * len(prepared)
        for idx in batches.values():
            parts = [prepared[i] for i in idx]
            sub = parts[0][1]
            S_bars = torch.stack([part[4] for part in parts])
            moments = {k: torch.stack([part[5][k] for part in parts]) for k in self._state_keys}
            before = S_bars.clone()
            step = parts[0][5]["step"]
            if self.capturable:
                step = torch.stack([part[5]["step"] for part in parts]).reshape(-1, *[1] * (S_bars.dim() - 1))
            self._update_(S_bars, torch.stack([part[6] for part in parts]), {"step": step, **moments}, sub)
            if parts[0][8] is not None:  # held at a capacity: the step scaled on the device, then the decay
                scales = torch.stack([torch.as_tensor(part[8][0], dtype=S_bars.dtype) for part in parts])
                S_bars.copy_(before + (scales.reshape(-1, *[1] * (S_bars.dim() - 1)) * (S_bars - before)
                                       - parts[0][8][1] * before))
            if parts[0][7] is not None:  # entrywise weights on the step (the decay included)
                weights = torch.stack([part[7] for part in parts])
                S_bars.copy_(before + weights * (S_bars - before))
            norms = torch.linalg.vector_norm((S_bars - before).flatten(1), dim=1)
            for j, (i, part) in enumerate(zip(idx, parts)):
                padded = {"step": part[5]["step"], **{k: moments[k][j] for k in self._state_keys}}
                pending[i] = (part[0], sub, part[2], part[3], S_bars[j], padded, norms[j])
        return pending

    def _prepare_coefficient(self, layer: LowRankMatrixModule, Ut: Tensor, Vt: Tensor, G_S: Tensor,
                             group: dict) -> tuple:
        """One layer's ``S̄``, padded moments, ``G_S``, the group with its step size and the
        entrywise weights of its step (or ``None``), before the update."""
        S = layer.S
        a, b = S.shape[0] + Ut.shape[1], S.shape[1] + Vt.shape[1]
        state = self.state[S]
        if "step" not in state:
            state["step"] = self._new_step(S)
            for key in self._state_keys:
                state[key] = torch.zeros_like(S)
        state["step"] += 1
        if (a, b) == tuple(S.shape[:2]):  # no new directions: nothing to pad (the update stacks copies)
            S_bar = S.detach()
            padded = {"step": state["step"], **{k: state[k] for k in self._state_keys}}
        else:
            S_bar = pad_block(S.detach(), a, b)
            padded = {"step": state["step"], **{k: pad_block(state[k], a, b) for k in self._state_keys}}
        G_S = G_S.to(S_bar.dtype)
        if self.carry_moments:
            self._project_carried(layer, Ut, Vt, state, padded)
        self._fill_new_moments(padded, G_S, S.shape[0], S.shape[1], group)
        scale = self.coefficient_lr_scale(layer, S_bar)
        rescale = None
        if isinstance(scale, Tensor):  # of a layer held at a capacity (its active rank, on the device): the
            # update runs undecayed at lr, then its step is scaled and the decay lr·wd taken (no read)
            rescale = (scale, group["lr"] * group["weight_decay"])
            group = dict(group, weight_decay=0.0)
        elif scale != 1.0:  # a larger step on S̄, the same decay per step (lr·wd) as without it
            group = dict(group, lr=group["lr"] * scale, weight_decay=group["weight_decay"] / scale)
        return layer, group, Ut, Vt, S_bar, padded, G_S, self.coefficient_step_weight(layer, S_bar), rescale

    def _project_carried(self, layer, Ut: Tensor, Vt: Tensor, state: dict, padded: dict) -> None:
        """Moments of the new directions from those the last truncation cut: with ``C_U``, ``C_V``
        the cut directions and ``M_c`` the moment in the coordinates ``[U | C_U]``, ``[V | C_V]``,
        ``M̄ = Bᵀ M_c C`` for ``B = diag(I, C_Uᵀ Ũ)``, ``C = diag(I, C_Vᵀ Ṽ)`` — the projection of
        the whole previous augmented moment onto the new augmented space (the paper projects only
        its kept block and starts the new directions at zero). The kept block stays bit for bit."""
        C_U, C_V = state.get("carry_U"), state.get("carry_V")
        r = layer.S.shape[0]
        if (C_U is None or isinstance(layer, TuckerConv2d) or C_U.shape[0] != Ut.shape[0]
                or C_V.shape[0] != Vt.shape[0] or state["carry_" + self._state_keys[0]].shape[0] != r + C_U.shape[1]
                or not (Ut.shape[1] or Vt.shape[1])):
            return
        B = pad_block(torch.eye(r, dtype=Ut.dtype, device=Ut.device), r + C_U.shape[1], r + Ut.shape[1])
        B[r:, r:] = C_U.mT @ Ut
        C = pad_block(torch.eye(r, dtype=Vt.dtype, device=Vt.device), r + C_V.shape[1], r + Vt.shape[1])
        C[r:, r:] = C_V.mT @ Vt
        for key in self._state_keys:
            carried = state["carry_" + key]
            if key in self._second_moment_keys:
                full = rotate_second_moment(carried, B, C, self.second_moment)
            else:
                full = rotate_first_moment(carried, B, C)
            full[:r, :r] = state[key]
            padded[key] = full

    def _truncate(self, pending: list[tuple]) -> None:
        """Steps 6–7 for all layers at once: the SVDs of every ``Ŝ`` (per channel mode of a Tucker
        core) batched by :meth:`_svds`, one read of the new ranks from the device (on the steps that
        choose ranks, see ``rank_every``); then each layer's rank change, in one place. On the steps that
        keep the ranks, ``truncation="subspace"`` takes the matrix layers' truncations without an SVD."""
        choose = False
        if not self.fixed_ranks:  # counted where ranks may be chosen (a compiled step need not guard on a count)
            count = self.param_groups[0].get("truncations", 0)
            for group in self.param_groups:
                group["truncations"] = count + 1
            choose = not count % self.rank_every
        everything = pending
        if not choose and self.truncation == "subspace":
            self._truncate_by_subspaces([item for item in pending if not isinstance(item[0], TuckerConv2d)])
            pending = [item for item in pending if isinstance(item[0], TuckerConv2d)]
        svds, order, sigmas = self._svds(pending)
        # the ranks the layers had before this cycle's augmentation (update_every > 1: they hold it); a layer
        # held at a capacity: its active rank, on the device
        before = [self.state[item[0].S].pop("cycle_ranks", None) or _ranks_of(item[0]) for item in pending]
        held = [item[0] in self._held for item in pending]
        if not choose:  # keep the ranks: the truncation only rotates the bases
            new_ranks = [_active_rank(pending[i][0]) if held[i] else before[i][0 if mode is None else mode]
                         for i, mode in order]
        elif self.budget is not None and pending:
            new_ranks = self._allocate(pending, svds, order)
        elif sigmas:
            spectra = torch.nn.utils.rnn.pad_sequence([v.double() for v in sigmas], batch_first=True)
            taus = [pending[i][1]["tau"] for i, _ in order]
            if len(set(taus)) == 1:  # one tolerance: no host-to-device copy (a synchronisation)
                taus = taus[0]
            else:
                taus = torch.tensor(taus, dtype=torch.float64).to(spectra.device, non_blocking=True)
            found = untruncated_rank(spectra, taus)
            # layers held at a capacity take their ranks on the device: no read unless another layer needs one
            new_ranks = list(found.unbind()) if all(held) else found.tolist()
        else:
            new_ranks = []
        if self.distributed and pending and choose and not all(held):
            new_ranks = broadcast_ints(new_ranks, pending[0][4].device)  # rank 0's decision: shapes agree
        ranks = dict(zip(order, new_ranks))
        for i, (layer, group, Ut, Vt, S_bar, padded, step_norm) in enumerate(pending):
            if isinstance(layer, TuckerConv2d):
                (P_out, s_out), (P_in, s_in) = svds[i]
                r_out = clip_rank(ranks[(i, 0)], s_out.shape[0], group["min_rank"], _cap(group, layer.S.shape[0]))
                r_in = clip_rank(ranks[(i, 1)], s_in.shape[0], group["min_rank"], _cap(group, layer.S.shape[1]))
                P1, R1 = P_out[:, :r_out], P_in[:, :r_in]
                S_new = in_channel_modes(rotate_first_moment, S_bar, P1, R1)
            elif held[i]:
                P, sigma, R = svds[i]
                self._apply_held(layer, group, Ut, Vt, P, sigma, R, ranks[(i, None)], S_bar, padded, step_norm)
                continue
            else:
                P, sigma, R = svds[i]
                r1 = clip_rank(ranks[(i, None)], sigma.shape[0], group["min_rank"], _cap(group, layer.S.shape[0]))
                P1, S_new, R1 = P[:, :r1], torch.diag(sigma[:r1]), R[:, :r1]
                if self.carry_moments and self.project_moments:
                    self._store_carried(layer, Ut, Vt, P, R, r1, padded)
            kept = s_out[:r_out] if isinstance(layer, TuckerConv2d) else sigma[:r1]
            self._record(layer, S_bar, S_new, P1, R1, step_norm, kept)
            self._apply_truncation(layer, Ut, Vt, P1, S_new, R1, padded)
        if self.distributed and everything:  # bit-identical factors and moments on every process
            self.bytes_communicated += broadcast_(
                [t.data for item in everything for t in item[0].factor_parameters()]
                + [t for item in everything for t in self._shared_state(item[0])])

    def _truncate_by_subspaces(self, pending: list[tuple]) -> None:
        """``truncation="subspace"``, on a step that keeps the ranks: each matrix layer's ``Ŝ`` cut back to
        the rank it holds by :func:`~lrc.linalg.subspace_truncation` (layers of one shape batched) — no SVD,
        no read. ``S`` is then not diagonal; the diagnostics' ``spectrum_ratio`` takes the row norms of the
        new ``S`` for its singular values."""
        groups: dict[tuple, list[int]] = {}
        for i, item in enumerate(pending):
            layer = item[0]
            key = (tuple(item[4].shape), item[4].dtype, item[4].device, layer.S.shape[0], layer.rank_mask is not None)
            groups.setdefault(key, []).append(i)
        for idx in groups.values():
            layers = [pending[i][0] for i in idx]
            S_hats = torch.stack([pending[i][4] for i in idx])
            if layers[0].rank_mask is not None:
                keep = torch.stack([layer.rank_mask for layer in layers]).to(S_hats.dtype)
            else:
                keep = S_hats.new_ones(len(idx), layers[0].S.shape[0])
            P1s, S1s, R1s = subspace_truncation(S_hats, keep)
            for j, i in enumerate(idx):
                layer, _, Ut, Vt, S_bar, padded, step_norm = pending[i]
                P1, S1, R1 = P1s[j], S1s[j], R1s[j]
                rows = torch.linalg.vector_norm(S1, dim=1)
                if layer in self._held:
                    self._record(layer, S_bar, S1, P1, R1, step_norm, rows, keep[j])
                    full = pad_block(keep[j][None], 1, self.capacity)[0]
                    self._write_held(layer, Ut, Vt, P1, S1, R1, full, padded)
                else:
                    self._record(layer, S_bar, S1, P1, R1, step_norm, rows)
                    self._apply_truncation(layer, Ut, Vt, P1, S1, R1, padded)

    def _apply_held(self, layer, group: dict, Ut: Tensor, Vt: Tensor, P: Tensor, sigma: Tensor, R: Tensor, rank,
                    S_bar: Tensor, padded: dict, step_norm: Tensor) -> None:
        """The truncation of a layer held at ``capacity`` columns: the same new weight and moments as
        :meth:`_apply_truncation` at rank ``r₁`` (``rank`` clipped as there, on the device), written into
        factors of ``capacity`` columns whose columns from ``r₁`` on are zero — in place once the layer is
        held, so that its shapes and storage never change — and the mask of its active columns."""
        C, U, S, V = self.capacity, *layer.factor_parameters()
        upper = min(sigma.shape[0], C)  # the most columns this Ŝ and the capacity give (max_rank ≤ capacity)
        if group["max_rank"] is not None:
            upper = min(upper, group["max_rank"])
        r1 = torch.as_tensor(rank, device=P.device).clamp(max=upper)
        if not group.get("grow", True):  # a truncation warm-up: ranks only shrink
            r1 = torch.minimum(r1, torch.as_tensor(_active_rank(layer), device=r1.device))
        r1 = r1.clamp(min=min(group["min_rank"], upper))
        keep = (torch.arange(C, device=P.device) < r1).to(P.dtype)
        kept = keep[: min(C, sigma.shape[0])]  # over the columns this Ŝ has (P, R and σ have as many)
        P1, R1, S_new = P[:, :C] * kept, R[:, :C] * kept, torch.diag(sigma[:C].to(P.dtype) * kept)
        self._record(layer, S_bar, S_new, P1, R1, step_norm, sigma[:C], kept)
        self._write_held(layer, Ut, Vt, P1, S_new, R1, keep, padded)

    def _write_held(self, layer, Ut: Tensor, Vt: Tensor, P1: Tensor, S_new: Tensor, R1: Tensor, keep: Tensor,
                    padded: dict) -> None:
        """A held layer's new factors (``P₁``, ``R₁``, ``S_new`` of fewer than ``capacity`` columns padded with
        zero ones), moments and mask ``keep`` (``capacity`` values)."""
        C, U, S, V = self.capacity, *layer.factor_parameters()
        if P1.shape[1] < C:  # a Ŝ narrower than the capacity (a compact layer at a rank below C/2)
            P1, R1, S_new = pad_block(P1, P1.shape[0], C), pad_block(R1, R1.shape[0], C), pad_block(S_new, C, C)
        state = self.state[S]
        self._rotate_moments(state, padded, P1, R1, in_place=U.shape[1] == C)
        factors = _new_factors(layer, Ut, Vt, P1, S_new, R1)
        if U.shape[1] == C:  # at the capacity already: the same storage (what a captured or compiled step needs)
            for p, value in zip((U, S, V), factors):
                p.copy_(value)
        else:
            layer.set_factors(*factors)
        if "rank_mask" in state:
            state["rank_mask"].copy_(keep)
        else:
            state["rank_mask"] = keep
        layer.rank_mask = state["rank_mask"]

    @torch.no_grad()
    def compact(self) -> None:
        """With ``capacity``: every layer held at the capacity sliced, with its moments, to its active rank
        (one read from the device), so that the model has its real size — to count, evaluate or save it.
        Its next step holds it at the capacity again (a change of shapes). ``lrc train`` calls it at the
        end of every epoch. Nothing to do without ``capacity``."""
        held = [layer for layer in self._layers.values() if layer.rank_mask is not None]
        if not held:
            return
        ranks = torch.stack([_active_rank(layer) for layer in held]).tolist()
        for layer, r in zip(held, ranks):
            U, S, V = layer.factor_parameters()
            state = self.state[S]
            for key in self._state_keys:
                state[key] = state[key][:r, :r].clone()
            state.pop("rank_mask", None)
            layer.rank_mask = None
            layer.set_factors(U[:, :r].clone(), S[:r, :r].clone(), V[:, :r].clone())

    def _svds(self, pending: list[tuple]) -> tuple[list, list, list[Tensor]]:
        """The sign-fixed SVDs of every layer's ``Ŝ``: per matrix layer ``(P, σ, R)``, per Tucker
        layer ``((P_out, σ_out), (P_in, σ_in))`` of its two channel-mode unfoldings; ``order``, the
        ``(layer index, mode)`` of each rank to choose (``mode`` ``None`` for a matrix layer); and
        the singular values behind each of those ranks. ``svd_batching="shape"``: one batched SVD
        per shape of ``Ŝ`` and two per Tucker layer; ``"padded"``: all of them in one call
        (:func:`~lrc.linalg.padded_svds`), one device synchronisation."""
        if not pending:
            return [], [], []
        order: list[tuple] = []
        for i, item in enumerate(pending):
            order += [(i, 0), (i, 1)] if isinstance(item[0], TuckerConv2d) else [(i, None)]
        svds: list = [None] * len(pending)
        if self._padded(pending[0][4]):
            mats = [pending[i][4] if mode is None else unfold(pending[i][4], mode) for i, mode in order]
            results = dict(zip(order, padded_svds(mats, [mode is None for _, mode in order])))
            for i, item in enumerate(pending):
                if isinstance(item[0], TuckerConv2d):
                    svds[i] = tuple(results[(i, mode)][:2] for mode in (0, 1))
                else:
                    svds[i] = results[(i, None)]
        else:
            by_shape: dict[tuple, list[int]] = {}
            for i, item in enumerate(pending):
                if isinstance(item[0], TuckerConv2d):
                    svds[i] = mode_svds(item[4])
                else:
                    by_shape.setdefault((tuple(item[4].shape), item[4].dtype, item[4].device), []).append(i)
            for idx in by_shape.values():
                P, sigma, R = sign_fixed_svd(torch.stack([pending[i][4] for i in idx]))
                for j, i in enumerate(idx):
                    svds[i] = (P[j], sigma[j], R[j])
        return svds, order, [svds[i][1] if mode is None else svds[i][mode][1] for i, mode in order]

    def _padded(self, like: Tensor) -> bool:
        return self.svd_batching == "padded" or (self.svd_batching == "auto" and like.device.type != "cpu")

    def _allocate(self, pending: list[tuple], svds: list, order: list) -> list[int]:
        """With ``target_cr``: the new ranks of all stepped layers from one budget
        (:func:`~lrc.linalg.allocate_ranks` on every layer's singular values; one read from the
        device), in the order of ``order``. Layers not stepped keep their size in the budget."""
        stepped = {item[0] for item in pending}
        budget = self.budget - sum(p.numel() for layer in self._layers.values() if layer not in stepped
                                   for p in layer.factor_parameters())
        vectors = [[svds[i][0][1], svds[i][1][1]] if isinstance(item[0], TuckerConv2d) else [svds[i][1]]
                   for i, item in enumerate(pending)]
        values = torch.cat([v.double().reshape(-1) for modes in vectors for v in modes]).tolist()
        layers, spectra, floors, caps, at = [], [], [], [], 0
        for item, modes in zip(pending, vectors):
            layer, group = item[0], item[1]
            spectrum = []
            for v in modes:
                spectrum.append(values[at:at + v.numel()])
                at += v.numel()
            cap = tuple(len(m) if _cap(group, r) is None else min(_cap(group, r), len(m))
                        for m, r in zip(spectrum, _ranks_of(layer)))
            layers.append(layer)
            spectra.append(spectrum)
            caps.append(cap)
            floors.append(tuple(min(group["min_rank"], c) for c in cap))
        cost = lambda i, r: _layer_cost(layers[i], r)  # noqa: E731
        least = sum(cost(i, f) for i, f in enumerate(floors))
        chosen = allocate_ranks(spectra, cost, max(budget, least), floors, caps, self.allocation)
        return [chosen[i][0 if mode is None else mode] for i, mode in order]

    def _store_carried(self, layer, Ut: Tensor, Vt: Tensor, P: Tensor, R: Tensor, r1: int, padded: dict) -> None:
        """Keep what the truncation to rank ``r1`` cuts: the directions ``Û P[:, r₁:]``,
        ``V̂ R[:, r₁:]`` and the moments in the coordinates of all singular vectors."""
        U, S, V = layer.factor_parameters()
        state, r = self.state[S], U.shape[1]
        state["carry_U"] = U @ P[:r, r1:] + Ut @ P[r:, r1:]
        state["carry_V"] = V @ R[:r, r1:] + Vt @ R[r:, r1:]
        for key in self._state_keys:
            if key in self._second_moment_keys:
                state["carry_" + key] = rotate_second_moment(padded[key], P, R, self.second_moment)
            else:
                state["carry_" + key] = rotate_first_moment(padded[key], P, R)

    def _keep(self, pending: list[tuple]) -> None:
        """``update_every > 1``, before the last step of a cycle: no truncation; each layer takes
        (or keeps) the augmented bases ``Û = [U | Ũ]``, ``V̂``, the updated ``S̄`` and the padded
        moments — exact, since ``Û S̄ V̂ᵀ`` is the updated weight."""
        for layer, _, Ut, Vt, S_bar, padded, step_norm in pending:
            U, S, V = layer.factor_parameters()
            state = self.state[S]
            state.setdefault("cycle_ranks", list(_ranks_of(layer)))  # what fixed ranks keep at the cycle's end
            for key in self._state_keys:  # own storage: the update stacked layers of one shape
                state[key] = padded[key].clone()
            layer.set_factors(torch.cat([U.detach(), Ut], 1), S_bar.clone(), torch.cat([V.detach(), Vt], 1))
        if self.distributed and pending:
            self.bytes_communicated += broadcast_(
                [t.data for item in pending for t in item[0].factor_parameters()]
                + [t for item in pending for t in self._shared_state(item[0])])

    def _hold(self, pending: list[tuple]) -> None:
        """``basis_every > 1``, between two basis updates: ``S ← S̄`` and the moments updated, in
        the bases and at the ranks the layers hold (no augmentation was made: ``S̄`` has the shape
        of ``S``). Every process computes the same values from the same averaged gradient, so
        nothing is broadcast. The diagnostics are those of the truncating steps (as with
        ``update_every``)."""
        for layer, _, _, _, S_bar, padded, _ in pending:
            S = layer.S
            with torch.no_grad():
                S.copy_(S_bar)
            state = self.state[S]
            for key in self._state_keys:  # own storage: the update stacked layers of one shape
                state[key] = padded[key].clone()

    def _shared_state(self, layer) -> list[Tensor]:
        """A layer's state tensors that every process must hold bit for bit."""
        state = self.state[layer.S]
        keys = list(self._state_keys) + [k for k in ("carry_U", "carry_V", "rank_mask") if k in state] \
            + ["carry_" + k for k in self._state_keys if "carry_" + k in state]
        return [state[k] for k in keys]

    def _record(self, layer, S_hat: Tensor, S_new: Tensor, P1: Tensor, R1: Tensor, step_norm: Tensor,
                kept: Tensor, keep: Tensor | None = None) -> None:
        """Add one step's diagnostics of ``layer`` to its sums, on the device (no read); ``kept``:
        the singular values the truncation kept (a Tucker core: of its output-channel unfolding); a
        layer held at a capacity: those of its columns and ``keep``, 1 where a column is active."""
        r_out, r_in = layer.S.shape[0], layer.S.shape[1]
        total = S_hat.square().sum()
        energy = torch.where(total > 0, 1.0 - S_new.square().sum() / total.clamp_min(torch.finfo(total.dtype).tiny),
                             0.0).clamp_min(0.0)
        # the new basis Û P₁ has the component Ũ P₁[r:] outside the old span: its norm is ‖sin Θ‖_F
        columns = (max(P1.shape[1], 1), max(R1.shape[1], 1)) if keep is None else (keep.sum().clamp_min(1),) * 2
        rotation = 0.5 * (P1[r_out:].square().sum() / columns[0]).sqrt() \
            + 0.5 * (R1[r_in:].square().sum() / columns[1]).sqrt()
        top = kept.max().to(total.dtype)  # the kept spectrum's smallest over its largest value
        least = kept.min() if keep is None else torch.where(keep > 0, kept[: keep.shape[0]], kept.max()).min()
        spread = torch.where(top > 0, least.to(total.dtype) / top.clamp_min(torch.finfo(total.dtype).tiny), 1.0)
        row = torch.stack([step_norm.to(total.dtype), rotation.to(total.dtype), energy, energy,
                           torch.ones((), dtype=total.dtype, device=total.device), spread])
        acc = self._diagnostics.get(layer)
        if acc is None:
            self._diagnostics[layer] = row
        else:
            acc[:3] += row[:3]
            acc[3] = torch.maximum(acc[3], row[3])
            acc[4] += 1
            acc[5] = row[5]  # a state, not a rate: the last truncation's

    def _apply_truncation(self, layer, Ut: Tensor, Vt: Tensor, P1: Tensor, S_new: Tensor, R1: Tensor,
                          padded: dict) -> None:
        """The one place where a layer's rank changes: new factors ``Û P₁``, ``V̂ R₁``, the
        new coefficient ``S_new`` and the moments rotated to the new bases (per spatial slice
        for a Tucker core: ``· ×₁ P₁ᵀ ×₂ R₁ᵀ``)."""
        state = self.state[layer.S]
        self._rotate_moments(state, padded, P1, R1)
        for key in self._state_keys:
            carried = state.get("carry_" + key)  # new_moments="project", matrix layers only
            if carried is not None and carried.shape[0] >= P1.shape[1]:
                carried[: P1.shape[1], : R1.shape[1]] = state[key]  # one value for the kept block
        layer.set_factors(*_new_factors(layer, Ut, Vt, P1, S_new, R1))

    def _rotate_moments(self, state: dict, padded: dict, P1: Tensor, R1: Tensor, in_place: bool = False) -> None:
        """The moments of the augmented coefficient (``padded``) in the new bases, into ``state`` (per
        spatial slice for a Tucker core: ``· ×₁ P₁ᵀ ×₂ R₁ᵀ``); ``in_place``: into the storage the state
        holds (a layer held at its capacity, whose shapes do not change)."""
        def rotate(rule, T, *args):  # a Tucker core: the matrix rule per spatial slice
            return in_channel_modes(rule, T, P1, R1, *args) if T.dim() > 2 else rule(T, P1, R1, *args)

        for key in self._state_keys:
            if not self.project_moments:  # the naive baseline: old coordinates, cut to the new rank
                value = padded[key][: P1.shape[1], : R1.shape[1]].clone()
            elif key in self._second_moment_keys:
                value = rotate(rotate_second_moment, padded[key], self.second_moment)
            else:
                value = rotate(rotate_first_moment, padded[key])
            if in_place and key in state and state[key].shape == value.shape:
                state[key].copy_(value)
            else:
                state[key] = value


def _stack(tensors: list[Tensor]) -> Tensor:
    """``torch.stack``, as a view (no copy) for a single tensor."""
    return tensors[0][None] if len(tensors) == 1 else torch.stack(tensors)


def _new_factors(layer, Ut: Tensor, Vt: Tensor, P1: Tensor, S_new: Tensor, R1: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(Û P₁, S_new, V̂ R₁)`` for ``Û = [U | Ũ]``, ``V̂ = [V | Ṽ]``, without forming ``Û``, ``V̂``."""
    U, _, V = layer.factor_parameters()
    r_out, r_in = U.shape[1], V.shape[1]
    return U @ P1[:r_out] + Ut @ P1[r_out:], S_new, V @ R1[:r_in] + Vt @ R1[r_in:]


def _square(layer, Ut: Tensor, Vt: Tensor, G_S: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """A matrix layer keeps a square ``S``: the augmented bases it keeps for a cycle get as many
    new columns on both sides (the narrower side's, e.g. ``min(r, m − r)``); ``G_S`` restricted
    to them is still exactly ``Ûᵀ∇W V̂``. A Tucker core may be rectangular."""
    if isinstance(layer, TuckerConv2d) or Ut.shape[1] == Vt.shape[1]:
        return Ut, Vt, G_S
    w, r = min(Ut.shape[1], Vt.shape[1]), layer.S.shape[0]
    return Ut[:, :w], Vt[:, :w], G_S[: r + w, : r + w]


def _cap(group: dict, current: int) -> int | None:
    """The highest rank a layer may take now: ``max_rank``, and its current rank while the
    group says ``grow=False`` (a truncation warm-up lets ranks only shrink)."""
    if group.get("grow", True):
        return group["max_rank"]
    return current if group["max_rank"] is None else min(group["max_rank"], current)


def _rank_bounds(layer) -> tuple[int, ...]:
    """The largest rank(s) a layer's factors can hold."""
    if isinstance(layer, TuckerConv2d):
        return (layer.out_channels, layer.in_channels)
    return (min(layer.out_dim, layer.in_dim),)


def _active_rank(layer) -> Tensor | int:
    """A matrix layer's rank: on the device (its mask's sum) while it is held at a capacity."""
    return layer.rank if layer.rank_mask is None else layer.rank_mask.sum().long()


def _ranks_of(layer) -> tuple[int, ...]:
    return tuple(layer.ranks) if isinstance(layer, TuckerConv2d) else (layer.rank,)


def _layer_cost(layer, ranks: tuple[int, ...]) -> int:
    """Parameters of ``layer``'s factors at ``ranks``."""
    if isinstance(layer, TuckerConv2d):
        kh, kw = layer.kernel_size
        return factor_parameter_count((layer.out_channels, layer.in_channels, kh * kw), ranks)
    return factor_parameter_count((layer.out_dim, layer.in_dim), ranks)
