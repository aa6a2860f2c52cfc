"""Check every fast path against its plain path, on any device, on tiny networks.

The search and training code takes shortcuts for speed: channels-last tensors, one ReLU shared by
all operations on the edges leaving a node, no ``none`` operation, an alpha step that computes no
weight gradient and a weight step that computes no alpha gradient, a fused recurrent search node,
a cross-entropy without log-softmax copies, batch norms that keep their output and max pooling that
finds its argmax again in the backward (less memory). Each is the same function as a plain path that the code
also exposes (a switch or a public argument); this script runs both on the same small inputs and
compares them. A GPU session runs it through ``benchmarks/gpu.sh``.

    python benchmarks/fastpaths.py                       # cuda when available, else cpu
    python benchmarks/fastpaths.py --device cpu          # about a minute on one thread
    python benchmarks/fastpaths.py --device cpu --quick  # smallest sizes, seconds (tests/test_fastpaths_script.py)
    python benchmarks/fastpaths.py --device cuda --only rnn/ --dtypes float32
    python benchmarks/fastpaths.py --device cpu --only rnn/ --compile   # with the compiled node kernels

One line per comparison: PASS or FAIL, the largest absolute difference, the relative error (largest
absolute difference / largest absolute value of the plain result) and the tolerance. Exit status 1
when any comparison fails (a check that raises counts as failed), 2 when no check ran.

Tolerances are relative and scale with the dtype, with no figure pinned to one machine:

* float64: ``K * eps`` with ``K`` per kind of result (forward value, gradient, second-order
  gradient); rounding stays far below it, a real bug is many orders above it.
* float32 (and any dtype below float64): the larger of ``K * eps`` and ``SLACK`` times the plain
  path's own rounding error, measured against the plain path in float64 on the same device and
  inputs (capped at ``CAP * sqrt(eps)``): the fast path must not be much less accurate than the
  plain one. The CNN search network's alpha gradients are the exception: their last digits change
  with any kernel (see ``check_cnn_channels_last``), so in float32 they are compared by direction
  with float64; float64 checks them exactly.
* Mixed precision (bf16 / fp16 autocast) against float32: a few eps of the autocast dtype.

TF32 is switched off, because the checks compare float32 with float32 (and with float64).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

try:
    import dartsnas  # noqa: F401
except ImportError:  # a bare machine with only the working tree: install it without touching dependencies
    import subprocess
    from pathlib import Path

    _src = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", str(_src), "--no-deps"], check=True)
    sys.path.insert(0, str(_src / "src"))  # this process started before the install

import torch
import torch.nn.functional as F

from dartsnas.data.images import ImageData, ImageSet
from dartsnas.engine.evaluate_cnn import autocast
from dartsnas.engine.search_cnn import SearchConfig, weight_step
from dartsnas.engine.search_cnn import build_search as build_cnn_search
from dartsnas.engine.search_rnn import RNNSearchConfig, TextBatch
from dartsnas.engine.search_rnn import build_search as build_rnn_search
from dartsnas.engine.train_cnn import train_step
from dartsnas.engine.train_rnn import weight_step as rnn_weight_step
from dartsnas.genotype import CNN_PRIMITIVES, get_genotype
from dartsnas.models.cnn import NetworkCIFAR
from dartsnas.models.rnn import RNNModel
from dartsnas.ops import fastconv, lean
from dartsnas.ops import loss as loss_mod
from dartsnas.ops.cnn import OPS
from dartsnas.search.cnn import MixedOp

# float64 tolerances, K * eps (float64 results measured on a CPU stay 10-100x below them).
K_FORWARD = 1e3  # a forward pass through a few cells
K_GRAD = 1e4  # first-order gradients: the backward pass adds as many roundings again
K_SECOND = 1e5  # second-order gradients: w', and a finite-difference or double-backward product on top
# Below float64: the fast path may be this many times as far from the plain one as the plain path
# (in that dtype) is from float64. Both carry their own rounding error, so 2 would be tight.
SLACK = 10.0
# ... but never looser than CAP * sqrt(eps) (3e-2 in float32): a fast path that far off is wrong, and
# a plain path that far from float64 means the two dtypes did not compute the same function.
CAP = 100.0
# Mixed precision against float32, relative to the autocast dtype's eps (bf16: 2**-7): rounding
# errors partly cancel over a network, so the loss moves by about one eps.
K_AMP = 4.0
COS_AMP = 0.9  # cosine of the alpha gradient under autocast (a small difference of large terms)
# Search-network alpha gradients below float64 (see check_cnn_channels_last): 1 - cosine with the
# float64 result at most COS_LOOSE * sqrt(eps) (3e-3 in float32).
COS_LOOSE = 10.0

Tensors = Any  # a tensor or a list of tensors
Results = dict[str, Tensors]


def _flat(ts: Tensors) -> torch.Tensor:
    if isinstance(ts, torch.Tensor):
        return ts.detach().reshape(-1).double().cpu()
    return torch.cat([t.detach().reshape(-1).double().cpu() for t in ts])


def _rel(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """Largest absolute difference, and that over the largest absolute value of ``ref``."""
    if not ref.numel():
        return 0.0, 0.0
    err = float((got - ref).abs().max())
    scale = float(ref.abs().max())
    return err, (err / scale if scale > 0 else (0.0 if err == 0 else math.inf))


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _cosine(a: Tensors, b: Tensors) -> float:
    fa, fb = _flat(a), _flat(b)
    return float(fa @ fb / (fa.norm() * fb.norm()))


class Checker:
    """Runs named checks and prints one PASS/FAIL line per comparison."""

    def __init__(self, only: str | None):
        self.only = only
        self.failures: list[str] = []
        self.lines = 0
        self._float64: dict[str, Results] = {}  # plain results in float64, the yardstick of lower dtypes

    def line(self, ok: bool, name: str, detail: str) -> None:
        if not ok:
            self.failures.append(name)
        self.lines += 1
        print(f"{'PASS' if ok else 'FAIL'}  {name:52s} {detail}", flush=True)

    def close(self, name: str, got: Tensors, ref: Tensors, k: float, dtype: torch.dtype,
              truth: Tensors | None = None, eps_of: torch.dtype | None = None) -> None:
        """``got`` equals ``ref`` to ``k * eps`` of ``eps_of`` (default: ``dtype``), relative to the
        largest value of ``ref``; with ``truth`` (``ref`` computed in float64), also to ``SLACK`` times
        ``ref``'s own distance from it."""
        a, b = _flat(got), _flat(ref)
        if a.shape != b.shape:
            self.line(False, name, f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
            return
        err, rel = _rel(a, b)
        tol, why = k * torch.finfo(eps_of or dtype).eps, "K*eps"
        if truth is not None:
            own = _rel(b, _flat(truth))[1]
            cap = CAP * math.sqrt(torch.finfo(dtype).eps)
            if SLACK * own > tol:
                tol, why = min(SLACK * own, cap), f"{SLACK:g}x plain-vs-float64"
                why += ", capped" if SLACK * own > cap else ""
        finite = bool(torch.isfinite(a).all() and torch.isfinite(b).all())
        note = "" if finite else "  NON-FINITE VALUES"
        self.line(finite and rel <= tol, name,
                  f"{_dt(eps_of or dtype):8s} max_abs {err:9.2e}  rel {rel:9.2e}  tol {tol:8.1e} ({why}){note}")

    def cosine_at_least(self, name: str, value: float, bound: float, what: str, dtype: torch.dtype) -> None:
        ok = math.isfinite(value) and value >= bound
        self.line(ok, name, f"{_dt(dtype):8s} {what}: 1 - cos {1 - value:9.2e}  (needs <= {1 - bound:.1e})")

    def direction(self, name: str, got: Tensors, ref: Tensors, truth: Tensors, dtype: torch.dtype) -> None:
        """``got`` points the way ``truth`` (``ref`` in float64) does: 1 - cos(got, truth) at most
        ``COS_LOOSE * sqrt(eps)``, or ``SLACK`` times ``ref``'s own 1 - cos(ref, truth)."""
        a, b, t = _flat(got), _flat(ref), _flat(truth)
        err, rel = _rel(a, b)
        off, own = 1 - _cosine(a, t), 1 - _cosine(b, t)
        bound = max(COS_LOOSE * math.sqrt(torch.finfo(dtype).eps), SLACK * own)
        self.line(math.isfinite(off) and off <= bound, name,
                  f"{_dt(dtype):8s} max_abs {err:9.2e}  rel {rel:9.2e}  1-cos vs float64 {off:8.1e} "
                  f"(plain {own:8.1e}, needs <= {bound:.1e})")

    def compare(self, name: str, key: str, results: Callable[[torch.dtype, bool], Results], dtype: torch.dtype,
                k: Callable[[str], float], loose: Sequence[str] = ()) -> None:
        """``results(dtype, fast)`` for fast=True against fast=False, entry by entry; below float64,
        the entries in ``loose`` are compared by direction with the plain result in float64."""
        fast, plain = results(dtype, True), results(dtype, False)
        truth = None
        if dtype == torch.float64:
            self._float64[key] = plain
        elif torch.finfo(dtype).eps > torch.finfo(torch.float64).eps:
            truth = self._float64.get(key) or results(torch.float64, False)
        for entry in fast:
            if truth is not None and entry in loose:
                self.direction(f"{name}/{entry}", fast[entry], plain[entry], truth[entry], dtype)
            else:
                self.close(f"{name}/{entry}", fast[entry], plain[entry], k(entry), dtype,
                           None if truth is None else truth[entry])

    def run(self, name: str, fn: Callable[..., None], *args: Any) -> None:
        if self.only and self.only not in name:
            return
        t0 = time.perf_counter()
        try:
            fn(self, name, *args)
        except Exception as e:  # noqa: BLE001 (a check that crashes has failed; the others still run)
            self.line(False, name, f"raised {type(e).__name__}: {e}")
            traceback.print_exc(limit=4, file=sys.stdout)
        print(f"      ({name}: {time.perf_counter() - t0:.1f} s)", flush=True)


def _k_by_name(entry: str) -> float:
    if "order2" in entry:
        return K_SECOND
    if "grad" in entry or "step" in entry:
        return K_GRAD
    return K_FORWARD


def _strict_fp32() -> None:
    """No TF32 in float32 matrix products and convolutions."""
    if hasattr(torch.backends, "fp32_precision"):  # PyTorch >= 2.9; mixing it with allow_tf32 is an error
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        torch.backends.cudnn.conv.fp32_precision = "ieee"
        torch.backends.cudnn.rnn.fp32_precision = "ieee"
    else:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def _randn(shape: Sequence[int], seed: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # Drawn on the CPU (every device sees the same values) and rounded to float32, so that float32
    # and its float64 yardstick start from the same numbers.
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).float()
    return x.to(device, dtype)


def _randint(high: int, shape: Sequence[int], seed: int, device: torch.device) -> torch.Tensor:
    return torch.randint(0, high, tuple(shape), generator=torch.Generator().manual_seed(seed)).to(device)


# -- sizes --------------------------------------------------------------------------------------

SIZES = {
    # cnn: search network (C, cells, classes, batch, image side); rnn: recurrent search (vocabulary,
    # units, batch, bptt, nodes); ce: cross-entropy (rows, more than one chunk of its forward; classes);
    # train: evaluation network (C, cells, batch) on 32x32 images for its auxiliary head, whose last
    # BN sees one value per image per channel: batch 2 would make its gradient ill-conditioned.
    "quick": {"cnn": (4, 3, 3, 4, 8), "rnn": (11, 4, 3, 4, 4), "ce": (loss_mod._ROWS + 3, 7), "train": (4, 3, 4)},
    "full": {"cnn": (8, 5, 10, 6, 16), "rnn": (50, 12, 4, 6, 8), "ce": (2 * loss_mod._ROWS + 3, 300),
             "train": (6, 5, 8)},
}
# Virtual-step learning rate of the second-order checks: large, so that the implicit (Hessian) term
# is a large part of the gradient and an error in it cannot hide.
XI = 0.5


# -- CNN search network -------------------------------------------------------------------------


def _cnn_search(size: tuple, device: torch.device, dtype: torch.dtype, channels_last: str, hvp_r: float = 0.01,
                lean_memory: bool = True, flip_conv_backward: bool = True):
    """A seeded tiny search network after one real weight step (non-zero momentum buffers for the
    virtual step), with alphas away from uniform, and a training and a validation batch."""
    C, layers, classes, batch, side = size
    torch.manual_seed(3)
    cfg = SearchConfig(init_channels=C, layers=layers, hvp_r=hvp_r, channels_last=channels_last,
                       lean_memory=lean_memory, flip_conv_backward=flip_conv_backward)
    data = ImageData("t", ImageSet(torch.zeros(1, 3, side, side, dtype=torch.uint8), torch.zeros(1, dtype=torch.long)),
                     None, num_classes=classes, mean=(0.5,) * 3, std=(0.25,) * 3, pad=0, flip=False)
    model, w_opt, _, architect = build_cnn_search(cfg, data, device, dtype=dtype)
    with torch.no_grad():
        for i, a in enumerate(model.arch_parameters()):
            a.copy_(0.5 * _randn(a.shape, 100 + i, device, dtype))
    fmt = torch.channels_last if channels_last == "on" else torch.contiguous_format
    train = (_randn((batch, 3, side, side), 1, device, dtype).contiguous(memory_format=fmt),
             _randint(classes, (batch,), 2, device))
    valid = (_randn((batch, 3, side, side), 3, device, dtype).contiguous(memory_format=fmt),
             _randint(classes, (batch,), 4, device))
    weight_step(model, w_opt, *train, grad_clip=5.0)
    return model, w_opt, architect, train, valid


def check_cnn_channels_last(ck: Checker, name: str, size: tuple, device: torch.device, dtype: torch.dtype) -> None:
    """Search network in channels-last (``--channels_last on``) against contiguous (``off``): loss,
    alpha gradients of first order and of second order with both Hessian-vector products.

    In float64 all must agree to rounding. Below it, the alpha gradients of this network are a
    lottery at the last digits: a ReLU input or a max-pooling pair within rounding of a tie takes the
    other branch in another kernel (another memory format, another library, float64), which moves
    the gradient by 1e-3 to 1e-2 in single elements, for the plain path as much as for the fast one.
    So below float64 they are compared by direction with the float64 result (gross errors: a lost
    term, a wrong sign), and the finite difference, which turns such branch changes into O(1)
    differences, is left to float64.
    """

    def results(dt: torch.dtype, fast: bool) -> Results:
        model, _, arch, train, valid = _cnn_search(size, device, dt, "on" if fast else "off")
        if fast:
            assert model.stem[0].weight.is_contiguous(memory_format=torch.channels_last), "channels-last not applied"
        out = {"loss": F.cross_entropy(model(valid[0]), valid[1]), "alpha-grad-order1": arch.first_order_grad(valid)}
        if dt == torch.float64:
            out["alpha-grad-order2-fd"] = arch.unrolled_grad(train, valid, XI, hvp="fd")
        out["alpha-grad-order2-exact"] = arch.unrolled_grad(train, valid, XI, hvp="exact")
        return out

    ck.compare(name, "cnn/channels-last", results, dtype, _k_by_name,
               loose=("alpha-grad-order1", "alpha-grad-order2-exact"))


def check_cnn_custom_backward(ck: Checker, name: str, size: tuple, device: torch.device, dtype: torch.dtype,
                              what: str) -> None:
    """Search network with one custom backward on (the default) against PyTorch's operations:
    ``what`` = 'lean-memory' (``--lean_memory``: batch norms that keep their output, max pooling
    that finds its argmax again) or 'flipped-conv-backward' (``--flip_conv_backward``: depthwise
    input gradients by flipped-kernel convolutions). Loss, alpha gradients of first and second
    order, one weight step and the batch-norm running statistics it leaves.

    The backward rounds differently, so after the first weight step the float32 forward values
    differ in the last bits, and the alpha gradients meet the tie lottery of
    :func:`check_cnn_channels_last`: compared the same way (by direction below float64, the finite
    difference in float64 only)."""
    cl = "on" if device.type == "cpu" else "off"  # the format the search picks on this device
    cls = {"lean-memory": lean.LeanBatchNorm2d, "flipped-conv-backward": fastconv.FlippedBackwardConv2d}[what]

    def results(dt: torch.dtype, fast: bool) -> Results:
        switches = {"lean_memory": fast if what == "lean-memory" else True,
                    "flip_conv_backward": fast if what == "flipped-conv-backward" else True}
        model, w_opt, arch, train, valid = _cnn_search(size, device, dt, cl, **switches)
        assert any(isinstance(m, cls) for m in model.modules()) == fast, f"{what} not as asked"
        out = {"loss": F.cross_entropy(model(valid[0]), valid[1]), "alpha-grad-order1": arch.first_order_grad(valid)}
        if dt == torch.float64:
            out["alpha-grad-order2-fd"] = arch.unrolled_grad(train, valid, XI, hvp="fd")
        out["alpha-grad-order2-exact"] = arch.unrolled_grad(train, valid, XI, hvp="exact")
        before = [p.detach().clone() for p in model.weight_parameters()]
        weight_step(model, w_opt, *train, grad_clip=5.0)
        out["weight-step"] = [p.detach() - b for p, b in zip(model.weight_parameters(), before)]
        out["running-stats"] = [b for b in model.buffers() if b.is_floating_point()]
        return out

    ck.compare(name, f"cnn/{what}", results, dtype, _k_by_name,
               loose=("alpha-grad-order1", "alpha-grad-order2-exact"))


def check_cnn_hvp_agreement(ck: Checker, name: str, size: tuple, device: torch.device, dtype: torch.dtype) -> None:
    """``--hvp fd`` (the paper's central difference) against ``--hvp exact`` (double backward) through
    ``Architect.hvp_agreement`` (the ``--hvp_check`` statistics), in both memory formats.

    The difference agrees only while ``w +- r v / ||v||`` crosses no kink of ReLU or max pooling, and
    its cancellation error is ~ eps / r. At the paper's r = 0.01 it is a poor estimate on these
    networks, and in float32 no r is both small and accurate enough; so this runs in float64 with
    r = sqrt(eps), where 1 - cosine ~ eps (times the conditioning).
    """
    eps = torch.finfo(dtype).eps
    r = math.sqrt(eps)
    bound = 1.0 - K_GRAD * eps
    for cl in ("off", "on"):
        _, _, arch, train, valid = _cnn_search(size, device, dtype, cl, hvp_r=r)
        stats = arch.hvp_agreement(train, valid, XI)
        ck.cosine_at_least(f"{name}/channels-last-{cl}", stats["hvp_cosine"], bound, f"cos(Hv fd, exact) r={r:.0e}",
                           dtype)
        ck.line(stats["implicit_ratio"] > 0, f"{name}/channels-last-{cl}/implicit-term",
                f"{_dt(dtype):8s} implicit term {100 * stats['implicit_ratio']:.1f}% of the gradient norm (> 0)")
    _, _, arch, train, valid = _cnn_search(size, device, dtype, "off", hvp_r=r)
    g_fd = arch.unrolled_grad(train, valid, XI, hvp="fd")
    g_exact = arch.unrolled_grad(train, valid, XI, hvp="exact")
    ck.cosine_at_least(f"{name}/alpha-grad-order2", _cosine(g_fd, g_exact), bound, "cos(grad fd, grad exact)", dtype)


def _mixed_op_results(size: tuple, device: torch.device, dt: torch.dtype, how: str) -> Results:
    """MixedOp value and gradients (input, alphas) for both strides and memory formats.

    ``how``: 'shared' (one ReLU passed in as ``x_relu``, as the search cell does), 'separate' (each
    operation its own ReLU), 'with-none' (the paper's sum over every primitive, the zero op included).
    """
    C, _, _, batch, side = size
    out: Results = {}
    for stride in (1, 2):
        for fmt_name, fmt in (("contiguous", torch.contiguous_format), ("channels-last", torch.channels_last)):
            torch.manual_seed(5 + stride)
            mixed = MixedOp(C, stride).to(device, dt).to(memory_format=fmt)
            x = _randn((batch, C, side, side), 6, device, dt).contiguous(memory_format=fmt).requires_grad_()
            alpha = _randn((len(CNN_PRIMITIVES),), 7, device, dt).requires_grad_()
            w = torch.softmax(alpha, -1)
            if how == "shared":
                y = mixed(x, w, torch.relu(x))
            elif how == "separate":
                y = mixed(x, w)
            else:
                ops = dict(zip(mixed.op_index, mixed.ops))
                zero = OPS["none"](C, stride, False)
                y = sum(w[i] * (ops[i](x) if i in ops else zero(x)) for i in range(len(CNN_PRIMITIVES)))
            probe = _randn(y.shape, 8, device, dt)
            tag = f"stride{stride}-{fmt_name}"
            out[f"{tag}/value"] = y
            out[f"{tag}/grad"] = torch.autograd.grad((y * probe).sum(), [x, alpha])
    return out


def check_shared_relu(ck: Checker, name: str, size: tuple, device: torch.device, dtype: torch.dtype) -> None:
    """MixedOp with one ReLU shared by its operations (``x_relu``) against each operation's own ReLU."""
    ck.compare(name, "cnn/shared-relu",
               lambda dt, fast: _mixed_op_results(size, device, dt, "shared" if fast else "separate"), dtype,
               _k_by_name)


def check_no_none(ck: Checker, name: str, size: tuple, device: torch.device, dtype: torch.dtype) -> None:
    """MixedOp, which leaves ``none`` out, against the sum over every primitive with the zero op."""
    ck.compare(name, "cnn/no-none",
               lambda dt, fast: _mixed_op_results(size, device, dt, "separate" if fast else "with-none"), dtype,
               _k_by_name)


def check_cnn_steps(ck: Checker, name: str, size: tuple, device: torch.device, dtype: torch.dtype) -> None:
    """The alpha step's gradient (no weight gradients) and the weight step (no alpha gradients)
    against one plain ``loss.backward()`` over every parameter, then clipping and the same SGD."""
    cl = "on" if device.type == "cpu" else "off"  # the format the search picks on this device

    def results(dt: torch.dtype, fast: bool) -> Results:
        model, w_opt, arch, train, valid = _cnn_search(size, device, dt, cl)
        before = [p.detach().clone() for p in model.weight_parameters()]
        if fast:
            g_alpha = arch.first_order_grad(valid)
            weight_step(model, w_opt, *train, grad_clip=5.0)
        else:
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(valid[0]), valid[1]).backward()
            g_alpha = [a.grad.clone() for a in model.arch_parameters()]
            # A fresh model for the weight step (the alpha step above touched no weight, but its
            # forward pass moved the BN running statistics; they do not enter training-mode values).
            model, w_opt, _, train, _ = _cnn_search(size, device, dt, cl)
            w_opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(train[0]), train[1]).backward()  # alphas require grad here
            torch.nn.utils.clip_grad_norm_(model.weight_parameters(), 5.0)
            w_opt.step()
        return {"alpha-grad": g_alpha,
                "weight-step": [p.detach() - b for p, b in zip(model.weight_parameters(), before)]}

    ck.compare(name, "cnn/steps", results, dtype, _k_by_name)


# -- CIFAR-10 evaluation network ----------------------------------------------------------------


def _train_net(size: tuple, device: torch.device, dtype: torch.dtype, channels_last: bool, flip: bool = True):
    C, layers, batch = size
    torch.manual_seed(11)
    model = NetworkCIFAR(C, 10, layers, True, get_genotype("DARTS_V2")).to(device, dtype)
    if flip:
        fastconv.use_flipped_backward(model)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    model.drop_path_prob = 0.2
    opt = torch.optim.SGD(model.parameters(), 0.025, momentum=0.9, weight_decay=3e-4)
    x = _randn((batch, 3, 32, 32), 12, device, dtype).contiguous(memory_format=fmt)
    y = _randint(10, (batch,), 13, device)
    return model, opt, x, y


def _one_train_step(model, opt, x, y, amp_dtype=None, scaler=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``dartsnas train``'s step; the loss and the (clipped) gradients it stepped with."""
    torch.manual_seed(14)  # the same drop-path masks in every run
    loss, _ = train_step(model, opt, x, y, grad_clip=5.0, auxiliary_weight=0.4, amp_dtype=amp_dtype, scaler=scaler)
    return loss, [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]


def check_train_channels_last(ck: Checker, name: str, size: tuple, device: torch.device, dtype: torch.dtype) -> None:
    """The evaluation network's training step (auxiliary head, drop path) in channels-last against
    contiguous: loss and gradients. Below float64 the gradients are compared by direction: the two
    formats round the forward differently, and where two inputs of a max-pooling window are within
    that rounding of each other (DARTS_V2's reduction cells pool every input) the gradient goes to
    the other one; elementwise, that is an error of a few percent in the layers below, in either
    format. float64 compares them elementwise."""

    def results(dt: torch.dtype, fast: bool) -> Results:
        loss, grads = _one_train_step(*_train_net(size, device, dt, fast))
        return {"loss": loss, "grad": grads}

    ck.compare(name, "train/channels-last", results, dtype, _k_by_name, loose=("grad",))


def check_train_flipped(ck: Checker, name: str, size: tuple, device: torch.device, dtype: torch.dtype) -> None:
    """The evaluation network's training step with flipped-kernel depthwise input gradients
    (``--flip_conv_backward``, the default) against PyTorch's backward: loss and gradients."""
    cl = device.type == "cpu"

    def results(dt: torch.dtype, fast: bool) -> Results:
        loss, grads = _one_train_step(*_train_net(size, device, dt, cl, flip=fast))
        return {"loss": loss, "grad": grads}

    ck.compare(name, "train/flipped-conv-backward", results, dtype, _k_by_name)


def check_rnn_train_packed(ck: Checker, name: str, size: tuple, device: torch.device, dtype: torch.dtype) -> None:
    """The recurrent training step (DARTS_V2 cell, TAR, clip) with the cell's weights
    packed once per sequence and their gradients gathered (``--pack_weights``, the default) against
    one PyTorch product per time step: loss, gradients, and the evaluation logits."""
    ntoken, nhid, batch, bptt, _ = size

    def results(dt: torch.dtype, fast: bool) -> Results:
        torch.manual_seed(15)
        # Dropout rates 0, as in check_rnn_fused: masks that do not depend on the dtype.
        model = RNNModel(ntoken, nhid, nhid, nhid, 0.0, 0.0, 0.0, 0.0, 0.0, genotype=get_genotype("DARTS", kind="rnn"),
                         packed=fast).to(device, dt)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        params = list(model.parameters())
        tokens = _randint(ntoken, (bptt + 1, batch), 16, device)
        hiddens = [0.1 * _randn((batch, nhid), 17, device, dt)]
        loss = rnn_weight_step(model, opt, params, tokens[:-1], tokens[1:], hiddens, 1.0, 0.25, 1e-3)
        grads = [p.grad.detach().clone() for p in params]
        model.eval()
        with torch.no_grad():
            logits = model(tokens[:-1], hiddens[0]).logits
        return {"loss": [torch.tensor(loss, dtype=dt)], "grad": grads, "logits": [logits]}

    ck.compare(name, "train/rnn-packed-weights", results, dtype, _k_by_name)


# -- recurrent search ---------------------------------------------------------------------------


def check_rnn_fused(ck: Checker, name: str, size: tuple, device: torch.device, dtype: torch.dtype,
                    compile: bool = False) -> None:
    """The recurrent search cell's fused node (``fused=True``; with ``compile``, its kernels compiled
    as by ``--compile``) against the same mixture in plain autograd operations (``fused=False``):
    logits and hidden state, weight gradients, alpha gradients of first order and of second order
    with both Hessian-vector products."""
    ntoken, nhid, batch, bptt, nodes = size

    def results(dt: torch.dtype, fast: bool) -> Results:
        torch.manual_seed(3)
        # Dropout rates 0: the masks are drawn (all ones) and applied as in training, but do not
        # depend on the dtype, so float64 computes the same function as float32.
        cfg = RNNSearchConfig(emsize=nhid, nhid=nhid, nhidlast=nhid, nodes=nodes, batch_size=batch, bptt=bptt,
                              weight_decay=1e-2, dropout=0.0, dropouth=0.0, dropoutx=0.0, dropouti=0.0, dropoute=0.0,
                              beta=0.0)
        model, _, arch = build_rnn_search(cfg, ntoken, device, dtype=dt)
        with torch.no_grad():
            model.alphas.copy_(0.5 * _randn(model.alphas.shape, 20, device, dt))
        model.train()
        cells = [m for m in model.modules() if hasattr(m, "fused")]
        assert cells, "no module with a `fused` switch in the recurrent search model (renamed?)"
        for m in cells:
            m.fused = fast
            m.compile = fast and compile

        def batch_of(seed: int) -> TextBatch:
            tokens = _randint(ntoken, (bptt + 1, batch), seed, device)
            return TextBatch(tokens[:-1], tokens[1:], 0.1 * _randn((batch, nhid), seed + 1, device, dt), seed)

        train, valid = batch_of(21), batch_of(23)
        out = model(valid.data, valid.hidden, torch.Generator(device=device).manual_seed(valid.seed))
        weights = model.weight_parameters()
        loss = loss_mod.cross_entropy(out.logits.reshape(-1, ntoken), valid.targets.reshape(-1))
        g_w = torch.autograd.grad(loss, weights, allow_unused=True)
        return {
            "logits": [out.logits, out.hidden],
            "weight-grad": [torch.zeros_like(w) if g is None else g for g, w in zip(g_w, weights)],
            "alpha-grad-order1": arch.first_order_grad(valid),
            "alpha-grad-order2-fd": arch.unrolled_grad(train, valid, XI, hvp="fd"),
            "alpha-grad-order2-exact": arch.unrolled_grad(train, valid, XI, hvp="exact"),
        }

    ck.compare(name, "rnn/compile" if compile else "rnn/fused", results, dtype, _k_by_name)
    if compile:
        from dartsnas.search import rnn as rnn_search

        for kernel in (rnn_search._FORWARD, rnn_search._BACKWARD):
            # A kernel that failed to compile ran uncompiled: the comparison above then says nothing.
            if not kernel.active:
                raise RuntimeError(f"{kernel.label} was not compiled: {kernel.failed}")


# -- cross-entropy ------------------------------------------------------------------------------


def check_cross_entropy(ck: Checker, name: str, size: tuple, device: torch.device, dtype: torch.dtype) -> None:
    """``dartsnas.ops.loss.cross_entropy`` against ``F.cross_entropy``: value, gradient, and the
    gradient of the gradient along a direction (the double backward of ``--hvp exact``)."""
    rows, classes = size

    def results(dt: torch.dtype, fast: bool) -> Results:
        logits = (3 * _randn((rows, classes), 30, device, dt)).requires_grad_()
        targets = _randint(classes, (rows,), 31, device)
        loss = (loss_mod.cross_entropy if fast else F.cross_entropy)(logits, targets)
        g, = torch.autograd.grad(loss, logits, create_graph=True)
        hv, = torch.autograd.grad((g * _randn((rows, classes), 32, device, dt)).sum(), logits)
        return {"value": loss, "grad": g, "grad-of-grad": hv}

    ck.compare(name, "loss/cross-entropy", results, dtype, _k_by_name)


# -- mixed precision ----------------------------------------------------------------------------


def check_amp(ck: Checker, name: str, sizes: dict, device: torch.device, amp_dtype: torch.dtype) -> None:
    """Autocast against float32: the search network's loss and alpha gradient (the search engine runs
    in float32; this shows whether the network survives autocast), and the evaluation network's
    training step as ``dartsnas train --amp`` runs it."""
    dtype = torch.float32
    tag = _dt(amp_dtype)
    cl = "on" if device.type == "cpu" else "off"
    model, _, arch, _, valid = _cnn_search(sizes["cnn"], device, dtype, cl)
    loss32 = F.cross_entropy(model(valid[0]), valid[1])
    g32 = arch.first_order_grad(valid)
    with autocast(device, amp_dtype):
        logits = model(valid[0])
    loss_amp = F.cross_entropy(logits.float(), valid[1])
    ck.close(f"{name}/search-loss", loss_amp, loss32, K_AMP, dtype, eps_of=amp_dtype)
    g_amp = torch.autograd.grad(loss_amp, model.arch_parameters())
    ck.cosine_at_least(f"{name}/search-alpha-grad", _cosine(g_amp, g32), COS_AMP, "cos(autocast, float32)",
                       amp_dtype)

    loss_ref, _ = _one_train_step(*_train_net(sizes["train"], device, dtype, False))
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    # Channels-last on CUDA under autocast: what ``--channels_last auto`` picks there.
    loss_amp, g_amp = _one_train_step(*_train_net(sizes["train"], device, dtype, device.type == "cuda"),
                                      amp_dtype=amp_dtype, scaler=scaler)
    ck.close(f"{name}/train-step-loss", loss_amp, loss_ref, K_AMP, dtype, eps_of=amp_dtype)
    if scaler is None:  # fp16's first scaled step may overflow (inf gradients, step skipped), as designed
        ck.line(bool(torch.isfinite(_flat(g_amp)).all()), f"{name}/train-step-grad", f"{tag:8s} finite gradients")


# -- main ---------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtypes", default="float64,float32",
                   help="comma-separated; float64 first, so that float32's yardstick is reused")
    p.add_argument("--quick", action="store_true", help="smallest sizes (seconds; for CI)")
    p.add_argument("--only", help="run only the checks whose name contains this text (e.g. rnn/, cnn/)")
    p.add_argument("--threads", type=int, help="CPU threads for PyTorch (default: PyTorch's choice)")
    p.add_argument("--no-amp", action="store_true", help="skip the mixed-precision checks")
    p.add_argument("--compile", action="store_true",
                   help="also check the recurrent search with --compile (torch.compile; about a minute of compiling)")
    p.add_argument("--no-onednn", action="store_true",
                   help="CPU: run without oneDNN (mkldnn) kernels, to tell their errors from ours")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but torch.cuda.is_available() is False")
    if args.threads:
        torch.set_num_threads(args.threads)
    _strict_fp32()
    if args.no_onednn:
        torch.backends.mkldnn.enabled = False
    dtypes = [getattr(torch, d.strip()) for d in args.dtypes.split(",")]
    sizes = SIZES["quick" if args.quick else "full"]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"fastpaths: torch {torch.__version__}, {device} ({where}), {'quick' if args.quick else 'full'} sizes, "
          f"dtypes {', '.join(_dt(d) for d in dtypes)}" + (", oneDNN off" if args.no_onednn else ""), flush=True)
    t0 = time.perf_counter()
    ck = Checker(args.only)
    for dtype in dtypes:
        d = _dt(dtype)
        ck.run(f"cnn/channels-last/{d}", check_cnn_channels_last, sizes["cnn"], device, dtype)
        ck.run(f"cnn/shared-relu/{d}", check_shared_relu, sizes["cnn"], device, dtype)
        ck.run(f"cnn/no-none/{d}", check_no_none, sizes["cnn"], device, dtype)
        ck.run(f"cnn/steps/{d}", check_cnn_steps, sizes["cnn"], device, dtype)
        for what in ("lean-memory", "flipped-conv-backward"):
            ck.run(f"cnn/{what}/{d}", check_cnn_custom_backward, sizes["cnn"], device, dtype, what)
        ck.run(f"train/channels-last/{d}", check_train_channels_last, sizes["train"], device, dtype)
        ck.run(f"train/flipped-conv-backward/{d}", check_train_flipped, sizes["train"], device, dtype)
        ck.run(f"train/rnn-packed-weights/{d}", check_rnn_train_packed, sizes["rnn"], device, dtype)
        ck.run(f"rnn/fused/{d}", check_rnn_fused, sizes["rnn"], device, dtype)
        if args.compile:
            ck.run(f"rnn/compile/{d}", check_rnn_fused, sizes["rnn"], device, dtype, True)
        ck.run(f"loss/cross-entropy/{d}", check_cross_entropy, sizes["ce"], device, dtype)
    # Always float64 (see its docstring), on the device under test.
    ck.run("cnn/hvp-fd-vs-exact/float64", check_cnn_hvp_agreement, sizes["cnn"], device, torch.float64)
    if not args.no_amp:
        amp_dtypes = [torch.bfloat16]
        if device.type == "cuda":
            amp_dtypes = ([torch.bfloat16] if torch.cuda.is_bf16_supported() else []) + [torch.float16]
        for amp_dtype in amp_dtypes:
            ck.run(f"amp/{_dt(amp_dtype)}", check_amp, sizes, device, amp_dtype)
    n_fail = len(ck.failures)
    print(f"fastpaths: {ck.lines - n_fail} passed, {n_fail} failed in {time.perf_counter() - t0:.1f} s"
          + (f"; failed: {', '.join(ck.failures)}" if n_fail else ""), flush=True)
    if ck.lines == 0:
        print("fastpaths: no check ran (see --only)", flush=True)
        return 2
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
