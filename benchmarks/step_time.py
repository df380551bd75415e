"""Time one training step (forward, backward, optimizer step) of an MLP 2048→2048→2048→2048→10.

    python benchmarks/step_time.py                     # CPU, batches 256 and 1024
    python benchmarks/step_time.py --device cuda --batches 1024 4096

Methods, all at rank 64 for the three 2048×2048 layers (the 10-way head stays dense):
  lowrank-adam fused     LowRankAdam, mode="fused" (rank held at 64: min_rank = max_rank = 64,
                         so every step augments to 128 and truncates back: the full cost)
  lowrank-adam fused every4  the same with update_every=4: one augmentation and one truncation
                         per 4 steps, the 2 steps between at the augmented rank 128 (mean over the cycle)
  lowrank-adam fused basis4  the same with basis_every=4: the full step once per 4 steps, the 3 between
                         move S alone in the bases and at the rank 64 the layers hold (GaLore's
                         amortisation; mean over the cycle)
  lowrank-adam fused sync-free  the fused step with augmentation="sync_free" (the new directions by
                         CholeskyQR2 without a host read or a QR: on a GPU in place of Householder)
  lowrank-adam fused capacity  the fused step with capacity=64 and svd_batching="padded": the layers
                         held at 64 columns, their ranks chosen on the device and masked, so that
                         no step reads the host or changes a shape (what a CUDA graph or a compiled
                         step needs); the augmentation is the sync-free one
  lowrank-adam fused sampled4, sampled8  the fused step with new_block_fraction=1/4, 1/8: the new-new
                         block of the coefficient gradient (the one block that needs products of the
                         batch's size beyond LoRA's) estimated from a quarter, an eighth of the batch;
                         every other block exact
  lowrank-adam parallel sampled4  mode="parallel" with new_block_fraction=1/4: the same G_S as fused
                         sampled4, the block formed in step() from the rows the backward kept
  lowrank-adam fused subspace  the fused step with fixed_ranks=True (the ranks are held at 64 anyway) and
                         truncation="subspace": no SVD, two block power iterations from the kept directions
  lowrank-adam fused capacity subspace  capacity=64, the sync-free augmentation and the subspace
                         truncation: a step that neither reads nor waits (on a GPU: capturable)
  lowrank-adam parallel subspace  mode="parallel" with the subspace truncation
  lowrank-adam fused compiled  capacity subspace with capturable=True (step counters and lr on the device),
                         opt.step() compiled whole by torch.compile(fullgraph=True) after one eager step
  (CUDA only) lowrank-adam fused graph, lowrank-adam parallel graph, dense adamw graph, lora floor graph
                         the whole step (forward,
                         backward, step()) captured in one CUDA graph and replayed — lrc's with
                         capturable=True, torch.optim's with capturable=True — so that the launches cost nothing
  lowrank-adam fused padded-r16  the fused step with svd_batching="padded" (every SVD of the step in
                         one call or few) and rank_every=16 (the ranks read and changed once per 16
                         truncations): the steady state of issue 12, the mean over 16 steps
  lowrank-adam two_pass  LowRankAdam, mode="two_pass" (a second forward/backward per step)
  lowrank-adam parallel  LowRankAdam, mode="parallel" (one pass; the new-new block of the
                         coefficient gradient dropped, so its backward has LoRA's four large
                         products and no more: every other block comes from G_K, G_L)
  dense adamw            torch.optim.AdamW on the dense model
  lora floor             W = A Bᵀ trained by torch.optim.Adam: the same forward/backward cost,
                         no geometry — the floor a geometric step can approach
Prints the median time per step over --steps steps after --warmup (the methods interleaved:
one step of each in turn, so that a drifting machine slows all alike), the split of the fused
step into forward / backward / step(), and the ratios.

    python benchmarks/step_time.py --model vgg16 --batches 128 --steps 5

``--model vgg16``: torchvision's ``vgg16(num_classes=10)`` on 32×32 inputs, its convolutions in
Tucker format and its linear layers as ``U S Vᵀ``, truncated from the (random) dense weights to a
95 % c.r. (``factorize(target_cr=95)``) and trained by ``LowRankAdam(target_cr=95)``; the LoRA
floor has the same ranks (convolutions as ``A Bᵀ`` matrices).

Every method also gets counted over one step: the operations dispatched (on a GPU each is about
one kernel launch; ``--device cuda`` counts the launches themselves) and the reads of a tensor's
value on the host (``.item()``, ``.tolist()``, ``bool()``...: on a GPU each waits for the device;
``--device cuda`` counts the synchronisations torch reports). Reads of the optimizers' step
counters are not counted: they live on the CPU, as torch.optim's, and never wait for a device.
On the CPU the last column also gives the waits a GPU would take for the same step: the calls of
``torch.linalg.svd`` (its error check waits once per call) and the reads, less those of the
CholeskyQR2 checks, which run on the CPU only (a GPU takes Householder QR, no read).

    python benchmarks/step_time.py --model vgg16 --count-only   # the counts only (one step, batch 8)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lrc import LowRankAdam, factorize
from lrc.layers import LowRankMatrixModule, TuckerConv2d

WIDTH, DEPTH, CLASSES, RANK = 2048, 3, 10, 64


class LoRALinear(nn.Module):
    """``x ↦ x B Aᵀ + b`` with plain parameters A (out×r), B (in×r)."""

    def __init__(self, dense: nn.Linear, rank: int) -> None:
        super().__init__()
        U, s, Vh = torch.linalg.svd(dense.weight.detach(), full_matrices=False)
        root = s[:rank].sqrt()
        self.A = nn.Parameter(U[:, :rank] * root)
        self.B = nn.Parameter(Vh[:rank].T * root)
        self.bias = nn.Parameter(dense.bias.detach().clone())

    def forward(self, x):
        return (x @ self.B) @ self.A.T + self.bias


def dense_mlp(device) -> nn.Sequential:
    torch.manual_seed(0)
    layers = []
    for _ in range(DEPTH):
        layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(WIDTH, CLASSES)).to(device)


_FACTORIZED: dict = {}


def build_vgg16(method: str, device):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.vgg16(num_classes=CLASSES).to(device)
    if method == "dense adamw":
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3), None
    if device not in _FACTORIZED:  # the truncation (minutes on a CPU) once, copied for each method
        factorize(model, target_cr=95.0, conv_format="tucker")
        _FACTORIZED[device] = model
    model = copy.deepcopy(_FACTORIZED[device])
    if method == "lora floor":  # LoRA at the ranks the truncation chose (a Tucker layer: its larger rank)
        dense = torchvision.models.vgg16(num_classes=CLASSES).to(device)
        ranks = {name: max(m.ranks) if isinstance(m, TuckerConv2d) else m.rank for name, m in model.named_modules()
                 if isinstance(m, (TuckerConv2d, LowRankMatrixModule))}
        factorize(dense, ranks=ranks, kind="lora")
        return dense, torch.optim.Adam(dense.parameters(), lr=1e-3), None
    mode = method.split()[1]
    return model, LowRankAdam(model, lr=1e-3, target_cr=95.0, mode=mode, **variant(method)), mode


def variant(method: str) -> dict:
    """The options a method's name adds to LowRankAdam."""
    if method.endswith("every4"):
        return {"update_every": 4}
    if method.endswith("basis4"):
        return {"basis_every": 4}
    if method.endswith("padded-r16"):
        return {"svd_batching": "padded", "rank_every": 16}
    if method.endswith(("sampled4", "sampled8")):
        return {"new_block_fraction": 1.0 / int(method[-1])}
    if method.endswith("sync-free"):
        return {"augmentation": "sync_free"}
    if method.endswith("capacity"):  # held at a fixed capacity: ranks on the device, shapes never change
        return {"capacity": RANK, "svd_batching": "padded"}
    if method.endswith(("compiled", "graph")):  # the same step, capturable: counters and lr on the device
        return {"capacity": RANK, "augmentation": "sync_free", "fixed_ranks": True, "truncation": "subspace",
                "capturable": True}
    if method.endswith("capacity subspace"):  # and no SVD on the steps that keep the ranks: nothing waits
        return {"capacity": RANK, "augmentation": "sync_free", "fixed_ranks": True, "truncation": "subspace"}
    if method.endswith("subspace"):  # the steps that keep the ranks truncate by power iterations
        return {"fixed_ranks": True, "truncation": "subspace"}
    return {}


def build(method: str, device, model_name: str = "mlp"):
    if model_name == "vgg16":
        return build_vgg16(method, device)
    model = dense_mlp(device)
    graph = method.endswith(" graph")  # torch.optim's step made capturable too, for its CUDA graph
    if method.removesuffix(" graph") == "dense adamw":
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3, capturable=graph), None
    if method.removesuffix(" graph") == "lora floor":
        for i in range(0, 2 * DEPTH, 2):
            model[i] = LoRALinear(model[i], RANK)
        return model, torch.optim.Adam(model.parameters(), lr=1e-3, capturable=graph), None
    factorize(model, rank=RANK)
    mode = method.split()[1]
    return model, LowRankAdam(model, lr=1e-3, tau=0.1, min_rank=RANK, max_rank=RANK, mode=mode,
                              **variant(method)), mode


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class _Count(TorchDispatchMode):
    """Counts the operations dispatched, the host reads of tensor values (except ``skip``; those
    inside a CholeskyQR2 check apart) and the SVD calls."""

    def __init__(self, skip: set[int]) -> None:
        super().__init__()
        self.ops, self.reads, self.cpu_only_reads, self.svds, self.skip = 0, 0, 0, 0, skip
        self.in_cholesky_qr2 = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        if func is torch.ops.aten._local_scalar_dense.default and id(args[0]) not in self.skip:
            if self.in_cholesky_qr2:
                self.cpu_only_reads += 1
            else:
                self.reads += 1
        if func.__name__.startswith("_linalg_svd"):
            self.svds += 1
        return func(*args, **(kwargs or {}))


def count_step(model, opt, step) -> tuple[int, int, int | None]:
    """(operations or CUDA kernel launches, host reads or CUDA synchronisations, on the CPU the
    waits a GPU would take — else None) of one ``step()``."""
    skip = {id(s["step"]) for s in opt.state.values() if "step" in s}
    device = next(model.parameters()).device
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught, \
                profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step()
                torch.cuda.synchronize()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        launches = sum(e.count for e in prof.key_averages() if e.key in ("cudaLaunchKernel", "cuLaunchKernel",
                                                                           "cudaLaunchKernelExC"))
        return launches, sum("synchroniz" in str(w.message) for w in caught), None
    import lrc.linalg

    reads = Counter()
    original, cholesky_qr2 = torch.Tensor.tolist, lrc.linalg._cholesky_qr2_against

    def tolist(t):  # a CPU tensor's tolist reads without dispatching; on a GPU it is a copy and a wait
        if id(t) not in skip:
            reads["cpu_only" if counter.in_cholesky_qr2 else "tolist"] += 1
        return original(t)

    def checked(*args):  # CholeskyQR2 runs on the CPU only: its reads are no GPU's waits
        counter.in_cholesky_qr2 = True
        try:
            return cholesky_qr2(*args)
        finally:
            counter.in_cholesky_qr2 = False

    torch.Tensor.tolist, lrc.linalg._cholesky_qr2_against = tolist, checked
    try:
        with _Count(skip) as counter:
            step()
    finally:
        torch.Tensor.tolist, lrc.linalg._cholesky_qr2_against = original, cholesky_qr2
    cpu_only = counter.cpu_only_reads + reads["cpu_only"]
    reads = counter.reads + reads["tolist"]
    return counter.ops, reads + cpu_only, reads + counter.svds


def make_batch(batch: int, device, model_name: str):
    if model_name == "vgg16":
        return torch.randn(batch, 3, 32, 32, device=device), torch.randint(0, CLASSES, (batch,), device=device)
    return torch.randn(batch, WIDTH, device=device), torch.randint(0, CLASSES, (batch,), device=device)


class Runner:
    """One method's model, optimizer and batch, stepped one step at a time (timed in parts)."""

    def __init__(self, method: str, batch: int, device, model_name: str) -> None:
        self.method, self.device = method, device
        self.model, self.opt, self.mode = build(method, device, model_name)
        self.x, self.y = make_batch(batch, device, model_name)
        self.parts: dict[str, list[float]] = {"total": [], "forward": [], "backward": [], "step": []}
        self.step_fn, self.graph = self.opt.step, None
        if method.endswith(" compiled"):  # opt.step() compiled whole, after an eager step holds the layers
            self.one_step()
            opt = self.opt
            self.step_fn = torch.compile(lambda: type(opt).step(opt), fullgraph=True)
        elif method.endswith(" graph"):
            self.graph = self._capture()

    def _capture(self):
        """The whole step (forward, backward, ``step()``) captured in a CUDA graph, after eager warm-up
        steps on a side stream (the first holds the layers at their capacity), as torch's docs on
        whole-network capture do; replayed on the same batch tensors."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                self.one_step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        self.opt.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            F.cross_entropy(self.model(self.x), self.y).backward()
            self.opt.step()
        return graph

    def closure(self):
        self.opt.zero_grad()
        loss = F.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        return loss

    def one_step(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        elif self.mode == "two_pass":
            self.opt.step(self.closure)
        else:
            self.closure()
            self.step_fn()

    def timed_step(self, keep: bool) -> None:
        sync(self.device)
        t0 = time.perf_counter()
        if self.graph is not None:  # one replay: the whole step, not split
            self.graph.replay()
            sync(self.device)
            t3 = time.perf_counter()
            t1 = t2 = t0
        elif self.mode == "two_pass":
            self.opt.step(self.closure)
            sync(self.device)
            t3 = time.perf_counter()
            t1 = t2 = t0
        else:
            self.opt.zero_grad()
            loss = F.cross_entropy(self.model(self.x), self.y)
            sync(self.device)
            t1 = time.perf_counter()
            loss.backward()
            sync(self.device)
            t2 = time.perf_counter()
            self.step_fn()
            sync(self.device)
            t3 = time.perf_counter()
        if keep:
            for key, value in zip(self.parts, (t3 - t0, t1 - t0, t2 - t1, t3 - t2)):
                self.parts[key].append(value)


def cycle_of(method: str) -> int:
    """Steps per cycle of a method whose steps differ (their mean is reported), else 1."""
    return 4 if method.endswith(("every4", "basis4")) else 16 if method.endswith("padded-r16") else 1


def time_methods(methods: list[str], batch: int, steps: int, warmup: int, device,
                 model_name: str = "mlp") -> dict[str, dict]:
    """Every method's step, timed **interleaved** — one step of each method in turn, ``steps``
    rounds — so that a machine whose speed drifts (a shared CPU, a GPU's clocks) slows every
    method alike and the ratios hold; then each method's counts over one cycle."""
    runners = [Runner(m, batch, device, model_name) for m in methods]
    for i in range(warmup + steps):
        for runner in runners:
            runner.timed_step(keep=i >= warmup)
    results = {}
    for runner in runners:
        cycle = cycle_of(runner.method)
        average = statistics.mean if cycle > 1 else statistics.median  # the steps of a cycle differ
        out = {k: average(v) * 1e3 for k, v in runner.parts.items()}

        def steps_of_a_cycle(runner=runner, cycle=cycle):
            for _ in range(cycle):
                runner.one_step()

        if runner.method.endswith(" compiled") and device.type != "cuda":  # its kernels are not dispatched ops
            out["ops"] = out["reads"] = out["waits"] = None
        else:
            ops, reads, waits = count_step(runner.model, runner.opt, steps_of_a_cycle)
            # a graph's replay is one launch of the whole graph, not its kernels': its syncs only
            out["ops"] = None if runner.graph is not None else ops / cycle
            out["reads"] = reads / cycle
            out["waits"] = None if waits is None else waits / cycle
        if hasattr(runner.opt, "finish_cycle"):
            runner.opt.finish_cycle()  # update_every: the model at its truncated ranks
        out["params"] = sum(p.numel() for p in runner.model.parameters())
        results[runner.method] = out
    return results


METHODS = ["dense adamw", "lowrank-adam fused", "lowrank-adam fused sampled4", "lowrank-adam fused sampled8",
           "lowrank-adam parallel sampled4", "lowrank-adam fused sync-free",
           "lowrank-adam fused capacity",
           "lowrank-adam fused subspace", "lowrank-adam fused capacity subspace", "lowrank-adam parallel subspace",
           "lowrank-adam fused every4",
           "lowrank-adam fused basis4", "lowrank-adam fused padded-r16", "lowrank-adam two_pass", "lowrank-adam parallel",
           "lowrank-adam fused compiled", "lora floor"]
GRAPHS = ["dense adamw graph", "lowrank-adam fused graph", "lowrank-adam parallel graph", "lora floor graph"]  # CUDA


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--model", choices=("mlp", "vgg16"), default="mlp")
    parser.add_argument("--count-only", action="store_true",
                        help="only the counts per step (one warm-up step, batch 8, no timing)")
    args = parser.parse_args()
    if args.count_only:
        args.batches, args.steps, args.warmup = [8], 1, 1
    device = torch.device(args.device)
    # capacity (and so the capturable step) holds matrix layers and takes no budget: not the Tucker VGG16 at
    # target_cr=95
    graphs = GRAPHS if device.type == "cuda" and args.model == "mlp" else []
    methods = [m for m in METHODS + graphs
               if not (args.model == "vgg16" and any(word in m for word in ("capacity", "compiled")))]
    if args.count_only:  # a compiled step's kernels are not counted as dispatched ops; a graph replays them
        methods = [m for m in methods if not m.endswith(("compiled", "graph"))]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    what = (f"MLP {WIDTH}x{DEPTH}→{CLASSES}, rank {RANK}" if args.model == "mlp"
            else "vgg16(num_classes=10) at 32×32, Tucker convolutions, target c.r. 95 %")
    count = ("CUDA kernel launches / synchronisations" if device.type == "cuda" else
             "ops dispatched / host reads / the waits a GPU would take (SVD calls + reads outside CholeskyQR2)")
    print(f"# step time, {what}, {name}, torch {torch.__version__}")
    print(f"# median of {args.steps} steps after {args.warmup} warm-up steps, milliseconds; per step: {count}\n")
    print("| batch | method | c.r. | step (ms) | forward | backward | opt.step() | ops or launches | reads or syncs "
          "| GPU waits |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    ratios, amortised_ratios, captured_ratios, cheaper_ratios = [], [], [], []
    for batch in args.batches:
        results = time_methods(methods, batch, args.steps, args.warmup, device, args.model)
        for m in methods:  # dense first: the c.r. is against it
            r = results[m]
            r["cr"] = 100.0 * (1.0 - r["params"] / results["dense adamw"]["params"])
            split = ("—", "—", "—") if m.endswith(("two_pass", "graph")) else (
                f"{r['forward']:.1f}", f"{r['backward']:.1f}", f"{r['step']:.1f}")
            waits = r["reads"] if r["waits"] is None else r["waits"]
            counts = ["—" if v is None else f"{v:g}" for v in (r["ops"], r["reads"], waits)]
            print(f"| {batch} | {m} | {r['cr']:.1f} % | {r['total']:.1f} | {split[0]} | {split[1]} | {split[2]} | "
                  f"{' | '.join(counts)} |", flush=True)
        if args.count_only:
            continue
        fused = results["lowrank-adam fused"]["total"]
        for amortised in ("every4", "basis4"):
            t = results[f"lowrank-adam fused {amortised}"]["total"]
            amortised_ratios.append((batch, amortised, t / fused, t / results["lora floor"]["total"],
                           t / results["dense adamw"]["total"]))
        ratios.append((batch, fused / results["lora floor"]["total"], fused / results["dense adamw"]["total"],
                       results["lowrank-adam two_pass"]["total"] / fused))
        for m in ("lowrank-adam fused sampled4", "lowrank-adam fused sampled8", "lowrank-adam parallel sampled4",
                  "lowrank-adam parallel", "lowrank-adam parallel subspace"):
            t = results[m]["total"]
            cheaper_ratios.append((batch, m.removeprefix("lowrank-adam "), t / fused,
                                   t / results["lora floor"]["total"], t / results["dense adamw"]["total"]))
        for m in [m for m in methods if m.endswith(("compiled", "graph"))]:
            t = results[m]["total"]
            captured_ratios.append((batch, m, t / fused, t / results["lora floor"]["total"],
                                    t / results["dense adamw"]["total"]))
    if args.count_only:
        return
    print("\n| batch | fused / LoRA floor | fused / dense AdamW | two_pass / fused |")
    print("| ---: | ---: | ---: | ---: |")
    for batch, lora, dense, two in ratios:
        print(f"| {batch} | {lora:.2f} | {dense:.2f} | {two:.2f} |")
    print("\n| batch | amortised | / fused | / LoRA floor | / dense AdamW |")
    print("| ---: | --- | ---: | ---: | ---: |")
    for batch, name, to_fused, to_lora, to_dense in amortised_ratios:
        print(f"| {batch} | fused {name} | {to_fused:.2f} | {to_lora:.2f} | {to_dense:.2f} |")
    print("\n| batch | cheaper every-step mode | / fused | / LoRA floor | / dense AdamW |")
    print("| ---: | --- | ---: | ---: | ---: |")
    for batch, name, to_fused, to_lora, to_dense in cheaper_ratios:
        print(f"| {batch} | {name} | {to_fused:.2f} | {to_lora:.2f} | {to_dense:.2f} |")
    print("\n| batch | compiled or captured | / fused | / LoRA floor | / dense AdamW |")
    print("| ---: | --- | ---: | ---: | ---: |")
    for batch, name, to_fused, to_lora, to_dense in captured_ratios:
        print(f"| {batch} | {name} | {to_fused:.2f} | {to_lora:.2f} | {to_dense:.2f} |")


if __name__ == "__main__":
    main()
