"""The exportable STFPM network (Wang et al., BMVC 2021): frozen teacher, trained student, distance maps.

Faithful to the official code (github gdwang08/STFPM @ 2598a5e, ``main.py``), checked against
``stfpm_reference_v1.npz``:

* teacher = the ImageNet backbone (frozen, always in eval mode), student = the same architecture
  randomly initialised and trained (``ResNet18_MS3(pretrained=False)``; here any backbone of
  :mod:`kdad.backbones`, the student mirroring the chosen teacher), both tapped at ``layer1..3``;
* per layer :func:`~kdad.methods.stfpm.loss.layer_distance` (``test()``'s ``sum_c (t^ - s^)^2``),
  bilinear (align_corners False) to the first layer's grid (``test()``'s fixed 64x64 = layer1 at 256 px),
  product over the layers = the score map;
* ``main()``'s ``cv2.resize`` of the score map to the input size (INTER_LINEAR = bilinear,
  align_corners False) = the anomaly map; image score = its maximum. No blur (the official code has none).

``forward(x)`` takes RGB images in [0, 1] (``[N, 3, S, S]``, ``S`` = the size the model was built for;
the backbones normalise inside) and returns ``(scores [N], maps [N, S, S])``. It has no numpy and no
data-dependent Python control flow, so it converts with ``paddle.jit.to_static(full_graph=True)``; the
resamplings are :class:`~kdad.layers.MatrixResize` (no interpolation op), so the exported graph runs
under oneDNN. The student's BatchNorm layers update their running variance as torch does
(:func:`kdad.batchnorm.use_unbiased_running_variance`). Training lives in :mod:`kdad.methods.stfpm.train`.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import paddle
from paddle.nn.layer.norm import _BatchNormBase

from kdad.backbones.base import Backbone
from kdad.batchnorm import use_unbiased_running_variance
from kdad.layers import MatrixResize, image_max
from kdad.methods.base import AnomalyModel
from kdad.methods.stfpm.loss import layer_distance

DEFAULT_LAYERS: Tuple[str, ...] = ("layer1", "layer2", "layer3")
Features = Dict[str, paddle.Tensor]


class STFPMModel(AnomalyModel):
    """STFPM scorer: ``self.backbone`` (teacher, frozen) and ``self.student`` (trainable), both
    :class:`~kdad.backbones.base.Backbone` s of the same architecture tapped at :attr:`layers`."""

    method = "stfpm"

    def __init__(self, teacher: Backbone, student: Backbone, image_size: int,
                 layers: Optional[Sequence[str]] = None) -> None:
        super().__init__()
        self.backbone = teacher.freeze()
        self.backbone_name = teacher.name
        self.layers: List[str] = list(layers if layers is not None else teacher.taps)
        if not self.layers:
            raise ValueError("STFPM needs at least one layer")
        for net, role in ((teacher, "teacher"), (student, "student")):
            missing = [tap for tap in self.layers if tap not in net.taps]
            if missing:
                raise ValueError(f"STFPM layers {missing} are not taps of the {role} (it has {net.taps})")
        if student.name != teacher.name:
            raise ValueError(f"the STFPM student must mirror the teacher: got student '{student.name}' "
                             f"for teacher '{teacher.name}'")
        self.student = use_unbiased_running_variance(student)
        statistics = {id(stat) for layer in self.student.sublayers(include_self=True)
                      if isinstance(layer, _BatchNormBase) for stat in (layer._mean, layer._variance)}
        for param in self.student.parameters():  # Paddle keeps BatchNorm statistics as parameters
            param.stop_gradient = id(param) in statistics
        self.image_size = int(image_size)
        sizes = self._probe_sizes()
        self.feature_sizes: Dict[str, Tuple[int, int]] = sizes
        self.grid: Tuple[int, int] = sizes[self.layers[0]]
        # each layer's map to the first layer's grid (None: already there; bilinear of a map onto its
        # own grid is the identity) and the score map to the input size
        self._to_grid: Dict[str, Optional[MatrixResize]] = {
            tap: None if sizes[tap] == self.grid else MatrixResize(sizes[tap], self.grid)
            for tap in self.layers}
        self._to_image = MatrixResize(self.grid, (self.image_size, self.image_size))
        self._freeze_unused_student_parameters()
        self.eval()

    def _probe_sizes(self) -> Dict[str, Tuple[int, int]]:
        """``{tap: (h, w)}`` at the model's input size, checked equal for teacher and student
        (one forward of a 1-image zero batch, both in eval mode)."""
        x = paddle.zeros([1, 3, self.image_size, self.image_size], dtype="float32")
        self.student.eval()
        with paddle.no_grad():
            teacher, student = self.backbone(x), self.student(x)
        sizes = {}
        for tap in self.layers:
            t_shape, s_shape = list(teacher[tap].shape), list(student[tap].shape)
            if t_shape != s_shape:
                raise ValueError(f"STFPM tap {tap}: teacher gives {t_shape}, student {s_shape}")
            sizes[tap] = (int(t_shape[2]), int(t_shape[3]))
        return sizes

    def _freeze_unused_student_parameters(self) -> None:
        """Student parameters that no tap depends on (an EfficientNet-Lite's later blocks and head)
        get ``stop_gradient``: they would never be updated (no gradient, so no weight decay either, as
        in torch), and data-parallel training without ``find_unused_parameters`` cannot reduce them.
        Found by one backward of a small batch (eval mode)."""
        self.student.eval()
        size = max(32, 2 * max(self.backbone.stride(tap) for tap in self.layers))
        with paddle.enable_grad():
            feats = self.student(paddle.zeros([1, 3, size, size], dtype="float32"))
            paddle.add_n([feats[tap].sum() for tap in self.layers]).backward()
        for param in self.student.parameters():
            if param.grad is None:
                param.stop_gradient = True
            param.clear_gradient(set_to_zero=False)

    def train(self, mode: bool = True) -> STFPMModel:  # the frozen teacher never leaves eval mode
        super().train(mode)
        self.backbone.eval()
        return self

    @property
    def trainable_parameters(self) -> List[paddle.Tensor]:
        """The student's parameters that training updates."""
        return [param for param in self.student.parameters() if not param.stop_gradient]

    # --- the computation, step by step (tests and tools use the pieces) ---------------------------

    def features(self, x: paddle.Tensor) -> Tuple[Features, Features]:
        """``(teacher taps, student taps)`` of [0, 1] RGB ``x``."""
        return self.backbone(x), self.student(x)

    def layer_maps(self, teacher: Features, student: Features) -> List[paddle.Tensor]:
        """Per layer the distance map at the layer's own resolution, ``[N, h_l, w_l]``."""
        return [layer_distance(teacher[tap], student[tap]) for tap in self.layers]

    def score_map(self, layer_maps: Sequence[paddle.Tensor]) -> paddle.Tensor:
        """The product over layers of the maps on the first layer's grid, ``[N, h_1, w_1]``
        (``test()``'s ``score_map``, before the resize to the input size)."""
        product = None
        for tap, layer_map in zip(self.layers, layer_maps):
            resize = self._to_grid[tap]
            resampled = layer_map if resize is None else resize(layer_map)
            product = resampled if product is None else product * resampled
        return product

    def anomaly_map(self, score_map: paddle.Tensor) -> paddle.Tensor:
        """The score map bilinear (align_corners False) to the input size, ``[N, S, S]``."""
        return self._to_image(score_map)

    def maps(self, x: paddle.Tensor) -> Tuple[List[paddle.Tensor], paddle.Tensor, paddle.Tensor]:
        """``(layer maps, score map, anomaly map)`` of the images ``x``."""
        layer_maps = self.layer_maps(*self.features(x))
        score_map = self.score_map(layer_maps)
        return layer_maps, score_map, self.anomaly_map(score_map)

    def forward(self, x: paddle.Tensor) -> Tuple[paddle.Tensor, paddle.Tensor]:
        size = x.shape[-1]
        if isinstance(size, int) and size > 0 and size != self.image_size:
            raise ValueError(f"this STFPM model was built for {self.image_size} px input; got {size} px")
        anomaly_map = self.maps(x)[2]
        return image_max(anomaly_map), anomaly_map


# --- building from a config -------------------------------------------------------------------------

def build_model(config: Mapping[str, Any]) -> STFPMModel:
    """The untrained :class:`STFPMModel` of ``config`` (keys ``backbone``, ``backbone_pretrained``,
    ``backbone_weights``, ``layers`` (empty: layer1-3), ``mvtec_img_size``, ``seed``). The student is
    initialised by the backbone's own initialisers right after ``paddle.seed(seed)``, so a config builds
    the same student every time; the teacher is built next (a random teacher, ``backbone_pretrained:
    False``, continues the same random stream: reproducible too, and different from the student)."""
    from kdad.backbones import build_backbone

    layers = list(config.get("layers") or DEFAULT_LAYERS)
    name = str(config["backbone"])
    paddle.seed(int(config["seed"]))
    student = build_backbone(name, layers, pretrained=False)
    teacher = build_backbone(name, layers, pretrained=bool(config["backbone_pretrained"]),
                             weights_path=config.get("backbone_weights") or None)
    return STFPMModel(teacher, student, image_size=int(config["mvtec_img_size"]), layers=layers)
