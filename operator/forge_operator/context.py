"""What every handler needs: the settings and the API door, built once at start-up."""

from __future__ import annotations

from dataclasses import dataclass

from forge_operator.kube import Kube
from forge_operator.render import RenderOptions
from forge_operator.settings import Settings


@dataclass(frozen=True)
class OperatorContext:
    settings: Settings
    kube: Kube

    @property
    def options(self) -> RenderOptions:
        return self.settings.render_options()
