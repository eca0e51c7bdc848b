"""FAQD's student feature adapters: per tap a 1x1 convolution C -> C with bias, then ReLU."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from ._features import storage_names


class FeatureAdapters(nn.Module):
    """One ``Conv2d(C, C, 1, bias=True) -> ReLU`` per tap, applied to the student's maps only.

    ``channels`` maps each tap name to its channel count ``C`` (``out_channels``, when given, to
    the teacher's, for a student whose maps are narrower or wider: ``C_s -> C_t``). ``forward`` takes a dict
    ``{tap name: [B, C, H, W]}`` with exactly these taps and returns a dict with the same keys and
    shapes. The ReLU is not in-place, so tapped tensors are never overwritten. Submodules are stored
    under the tap names with ``.`` -> ``/`` (``adapters.layer1/0.0.weight``); they are trainable
    parameters that belong in the student's optimizer (FAQD: weight decay 1e-4).
    """

    def __init__(
        self, channels: Mapping[str, int], out_channels: Mapping[str, int] | None = None
    ) -> None:
        super().__init__()
        if not channels:
            raise ValueError("channels is empty; give {tap name: channel count of the student map}")
        out_channels = out_channels or channels
        self._names = storage_names(channels)
        self.adapters = nn.ModuleDict(
            {
                name: nn.Sequential(
                    nn.Conv2d(channels[tap], out_channels[tap], 1, bias=True), nn.ReLU()
                )
                for tap, name in self._names.items()
            }
        )

    def forward(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        if set(features) != set(self._names):
            raise ValueError(
                f"features for taps {sorted(features)} but adapters for {sorted(self._names)}; "
                "build FeatureAdapters with the taps you feed it"
            )
        return {tap: self.adapters[self._names[tap]](feature) for tap, feature in features.items()}
