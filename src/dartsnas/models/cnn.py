"""Networks built from a searched cell, trained from scratch (paper section 3.2, appendix A.2).

* :class:`NetworkCIFAR`: stem, ``layers`` cells with reductions at 1/3 and 2/3 depth, global
  average pooling, linear classifier (20 cells, C = 36 in the paper).
* :class:`NetworkImageNet`: the mobile setting, a three-convolution stem that brings 224x224
  down to 28x28 before the first cell (14 cells, C = 48).

Both optionally carry an auxiliary classifier on the output of cell ``2 * layers // 3``, used in
training only. Module names follow the authors' code so that their released ``cifar10_model.pt``
and ``imagenet_model.pt`` load with ``load_state_dict(strict=True)``.

``forward`` returns ``(logits, aux_logits)``, like the authors' networks; ``aux_logits`` is
``None`` in evaluation mode or without the auxiliary head.
"""

from __future__ import annotations

import torch
from torch import nn

from ..genotype import Edge, Genotype
from ..ops.cnn import OPS, FactorizedReduce, ReLUConvBN
from ..settings.choices import NETWORK_DEFAULTS  # noqa: F401 -- the paper's sizes, still importable from here


def drop_path(x: torch.Tensor, drop_prob: float) -> torch.Tensor:
    """Zero whole samples of an operation's output with probability ``drop_prob``.

    The survivors are scaled by ``1 / keep`` so that the expectation is unchanged (the authors' code,
    cnn/utils.py ``drop_path``; the "ScheduledDropPath" of NASNet). The mask is drawn per sample, not per element.
    """
    if drop_prob <= 0.0:
        return x
    keep = 1.0 - drop_prob
    mask = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device).bernoulli_(keep)
    return x * (mask / keep)


class Cell(nn.Module):
    """A cell of a final network: node ``k + 2`` sums the two operations ``2k`` and ``2k + 1``.

    The attribute names (``preprocess0``, ``preprocess1``, ``_ops``) are those of the authors'
    checkpoints.
    """

    def __init__(self, genotype: Genotype, C_prev_prev: int, C_prev: int, C: int, reduction: bool,
                 reduction_prev: bool):
        super().__init__()
        self.reduction = reduction
        # The previous cell halved the resolution, so the cell before it must be halved too.
        if reduction_prev:
            self.preprocess0: nn.Module = FactorizedReduce(C_prev_prev, C)
        else:
            self.preprocess0 = ReLUConvBN(C_prev_prev, C, 1, 1, 0)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0)
        edges: tuple[Edge, ...] = genotype.reduce if reduction else genotype.normal
        self._concat = tuple(genotype.reduce_concat if reduction else genotype.normal_concat)
        self._indices = tuple(idx for _, idx in edges)
        self._steps = len(edges) // 2
        self.multiplier = len(self._concat)
        self._ops = nn.ModuleList()
        for name, idx in edges:
            # Only edges leaving the cell's two inputs reduce the resolution.
            stride = 2 if reduction and idx < 2 else 1
            self._ops.append(OPS[name](C, stride, True))
        # Drop path leaves identities alone (the authors' code, cnn/model.py ``Cell.forward``):
        # dropping a skip connection would
        # remove the very path that keeps deep cells trainable.
        self._droppable = tuple(not isinstance(op, nn.Identity) for op in self._ops)

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, drop_prob: float = 0.0) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        use_drop = self.training and drop_prob > 0.0
        for i in range(self._steps):
            total = None
            for k in (2 * i, 2 * i + 1):
                h = self._ops[k](states[self._indices[k]])
                if use_drop and self._droppable[k]:
                    h = drop_path(h, drop_prob)
                total = h if total is None else total + h
            states.append(total)
        return torch.cat([states[i] for i in self._concat], dim=1)


class AuxiliaryHeadCIFAR(nn.Module):
    """Auxiliary classifier for an 8x8 input (paper section A.2, following NASNet)."""

    def __init__(self, C: int, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.AvgPool2d(5, stride=3, padding=0, count_include_pad=False),  # 8x8 -> 2x2
            nn.Conv2d(C, 128, 1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(inplace=True),
            nn.Conv2d(128, 768, 2, bias=False),  # 2x2 -> 1x1
            nn.BatchNorm2d(768),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class AuxiliaryHeadImageNet(nn.Module):
    """Auxiliary classifier of the ImageNet network.

    Unlike the CIFAR head it has no BatchNorm after the 768-channel convolution: the released
    model and the paper's numbers were obtained without it (the authors' code, cnn/model.py
    ``AuxiliaryHeadImageNet``).
    """

    def __init__(self, C: int, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.AvgPool2d(5, stride=2, padding=0, count_include_pad=False),
            nn.Conv2d(C, 128, 1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(inplace=True),
            nn.Conv2d(128, 768, 2, bias=False),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def reduction_cells(layers: int) -> tuple[int, int]:
    """Indices of the two reduction cells: at 1/3 and 2/3 of the depth."""
    return layers // 3, 2 * layers // 3


class _Network(nn.Module):
    """The cell stack shared by both networks; subclasses build the stem, then call ``_build_cells``."""

    auxiliary_head: nn.Module | None
    aux_min_size: int  # smallest feature map the auxiliary head accepts
    stem_halvings: int  # how often the stem halves the resolution

    def _build_cells(self, genotype: Genotype, C: int, layers: int, C_prev_prev: int, C_prev: int,
                     reduction_prev: bool) -> tuple[int, int]:
        """Add the cells; returns the channels after cell ``2 * layers // 3`` and after the last cell."""
        if not isinstance(genotype, Genotype):
            raise TypeError(f"a convolutional Genotype is needed, got {type(genotype).__name__}")
        if layers < 3:
            raise ValueError(f"a network needs at least 3 cells (two of them reduction cells), got {layers}")
        self.genotype = genotype
        self.layers = layers
        self.aux_index = 2 * layers // 3
        # Set by the training loop each epoch (scheduled drop path); 0 disables it.
        self.drop_path_prob = 0.0
        self.cells = nn.ModuleList()
        C_curr, C_aux = C, 0
        reductions = reduction_cells(layers)
        for i in range(layers):
            reduction = i in reductions
            if reduction:
                C_curr *= 2
            cell = Cell(genotype, C_prev_prev, C_prev, C_curr, reduction, reduction_prev)
            self.cells.append(cell)
            reduction_prev = reduction
            C_prev_prev, C_prev = C_prev, cell.multiplier * C_curr
            if i == self.aux_index:
                C_aux = C_prev
        return C_aux, C_prev

    def stem_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, aux: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """The logits, like any classifier (so ``nn.CrossEntropyLoss()(model(x), y)``, ``torch.jit.trace``
        and exports work). Training asks for the auxiliary tower's logits too (paper appendix A.2.1):
        ``aux=True`` returns ``(logits, aux_logits)``, the latter None outside training or without the
        head."""
        aux_logits = None
        s0, s1 = self.stem_forward(x)
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, self.drop_path_prob)
            if i == self.aux_index and self.training and self.auxiliary_head is not None:
                if min(s1.shape[-2:]) < self.aux_min_size:
                    raise ValueError(
                        f"the auxiliary head needs a feature map of at least {self.aux_min_size}x"
                        f"{self.aux_min_size} after cell {i}, got {tuple(s1.shape[-2:])}; use larger images "
                        f"or train without the auxiliary head")
                aux_logits = self.auxiliary_head(s1)
        logits = self.classifier(self.global_pooling(s1).flatten(1))
        return (logits, aux_logits) if aux else logits


class NetworkCIFAR(_Network):
    """The CIFAR-10 evaluation network (paper appendix A.2.1: 20 cells, C = 36)."""

    # AvgPool 5 stride 3 then a 2x2 convolution: the 8x8 map of 32x32 inputs is the smallest fit.
    aux_min_size = 8
    stem_halvings = 0

    def __init__(self, C: int, num_classes: int, layers: int, auxiliary: bool, genotype: Genotype,
                 in_channels: int = 3, stem_multiplier: int = 3):
        super().__init__()
        C_stem = stem_multiplier * C
        self.stem = nn.Sequential(nn.Conv2d(in_channels, C_stem, 3, padding=1, bias=False), nn.BatchNorm2d(C_stem))
        C_aux, C_last = self._build_cells(genotype, C, layers, C_stem, C_stem, reduction_prev=False)
        self.auxiliary_head = AuxiliaryHeadCIFAR(C_aux, num_classes) if auxiliary else None
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_last, num_classes)

    def stem_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.stem(x)
        return s, s


class NetworkImageNet(_Network):
    """The ImageNet mobile-setting network (paper appendix A.2.3: 14 cells, 224x224 input; C = 48 as in the authors' code)."""

    # AvgPool 5 stride 2 then a 2x2 convolution: the 7x7 map of 224x224 inputs is the smallest fit.
    aux_min_size = 7
    stem_halvings = 3  # three stride-2 convolutions

    def __init__(self, C: int, num_classes: int, layers: int, auxiliary: bool, genotype: Genotype,
                 in_channels: int = 3):
        super().__init__()
        if C % 2:
            raise ValueError(f"the ImageNet stem halves C, so it must be even, got {C}")
        self.stem0 = nn.Sequential(
            nn.Conv2d(in_channels, C // 2, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(C // 2),
            nn.ReLU(inplace=True),
            nn.Conv2d(C // 2, C, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(C),
        )
        self.stem1 = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(C, C, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(C),
        )
        # The stem reduces 8x, so the first cell treats both its inputs as following a reduction.
        C_aux, C_last = self._build_cells(genotype, C, layers, C, C, reduction_prev=True)
        self.auxiliary_head = AuxiliaryHeadImageNet(C_aux, num_classes) if auxiliary else None
        # The authors pool 7x7 (the map at 224x224 input); adaptive pooling is the same there and
        # also accepts other image sizes.
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_last, num_classes)

    def stem_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s0 = self.stem0(x)
        return s0, self.stem1(s0)


def aux_feature_size(dataset: str, image_size: int) -> int:
    """Side of the feature map the auxiliary head sees, for square inputs of ``image_size``.

    Every stride-2 convolution, pooling and factorized reduction here maps n to ceil(n / 2).
    """
    n = image_size
    # The auxiliary head follows the second reduction cell.
    for _ in range(NETWORKS[dataset].stem_halvings + 2):
        n = (n + 1) // 2
    return n


NETWORKS: dict[str, type[_Network]] = {"cifar10": NetworkCIFAR, "imagenet": NetworkImageNet}


def build_network(dataset: str, genotype: Genotype, init_channels: int, layers: int, auxiliary: bool,
                  num_classes: int) -> _Network:
    """The evaluation network of ``dataset`` ('cifar10' or 'imagenet') for ``genotype``."""
    return NETWORKS[dataset](init_channels, num_classes, layers, auxiliary, genotype)


def count_network_parameters(model: nn.Module, auxiliary: bool = False) -> int:
    """Parameters as the paper counts them: without the auxiliary head unless ``auxiliary``."""
    return sum(p.numel() for n, p in model.named_parameters() if auxiliary or "auxiliary" not in n)


def multiply_adds(model: nn.Module, image_size: int, in_channels: int = 3) -> int:
    """Multiply-accumulate operations of one inference forward pass (convolutions and linear layers).

    This is how mobile-setting budgets are counted (the paper's 574M for DARTS on ImageNet):
    batch norm, pooling and additions are not included.
    """
    total = 0

    def conv_hook(module: nn.Conv2d, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        nonlocal total
        kh, kw = module.kernel_size
        total += output[0].numel() * (module.in_channels // module.groups) * kh * kw

    def linear_hook(module: nn.Linear, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        nonlocal total
        total += module.in_features * module.out_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters())
        with torch.no_grad():
            model(torch.zeros(1, in_channels, image_size, image_size, dtype=p.dtype, device=p.device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total
