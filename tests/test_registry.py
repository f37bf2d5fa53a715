"""Registries refuse duplicates and list what they hold."""

from __future__ import annotations

import pytest

from pipeline.cli import main
from pipeline.core.registry import Registry, RegistryError


def test_duplicate_name_is_refused():
    reg: Registry[object] = Registry("thing")

    @reg.register("a")
    class A:
        pass

    with pytest.raises(RegistryError, match="thing 'a' is already registered"):

        @reg.register("a")
        class B:
            pass

    assert reg.list() == ["a"] and reg.get_class("a") is A and isinstance(reg.get("a"), A)
    with pytest.raises(RegistryError, match="unknown thing 'b'; known: a"):
        reg.get("b")


def test_project_registries_and_list_command(capsys):
    from extractors import EXTRACTORS
    from models import DETECTORS

    assert "i3d_inception" in EXTRACTORS.list()
    assert "sultani_mil" in DETECTORS.list()
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "i3d_inception" in out and "sultani_mil" in out
    assert "feature presets (extract.preset):" in out and "rtfm               RTFM's ResNet-50 I3D" in out
