"""The one registry helper (clusterformer/registry.py) and the registries built on it: tasks,
sample specs, architectures and backbones refuse a taken name unless it is replaced on purpose,
and load the modules that register names they do not know yet."""

from __future__ import annotations

import dataclasses

import pytest

from clusterformer.registry import DuplicateNameError, Registry


def test_entries_by_name_and_listing_in_registration_order() -> None:
    widgets: Registry[object] = Registry("widget")
    widgets.register("a", 1)

    @widgets.register("b")
    def b() -> None: ...

    assert widgets.names() == ["a", "b"] and list(widgets) == ["a", "b"] and len(widgets) == 2
    assert widgets.get("b") is b and widgets["a"] == 1 and "a" in widgets and "c" not in widgets
    assert widgets.items() == [("a", 1), ("b", b)]
    assert widgets.unregister("a") == 1 and widgets.names() == ["b"]
    with pytest.raises(ValueError, match="unknown widget 'a'; expected one of b"):
        widgets.get("a")
    with pytest.raises(ValueError, match="non-empty"):
        widgets.register("", 3)


def test_a_taken_name_is_refused_unless_replaced_on_purpose() -> None:
    widgets: Registry[int] = Registry("widget")
    widgets.register("a", 1)
    with pytest.raises(DuplicateNameError, match="widget 'a' is already registered.*replace=True"):
        widgets.register("a", 2)
    with pytest.raises(DuplicateNameError):  # the decorator refuses before it decorates
        widgets.register("a")
    assert widgets.get("a") == 1
    assert widgets.register("a", 2, replace=True) == 2 and widgets.get("a") == 2
    widgets.register("a", 2)  # the same entry again changes nothing


def test_an_unknown_name_loads_the_registering_modules_first() -> None:
    calls: list[str] = []

    def load() -> None:  # imports "modules" that register entries, skipping done ones
        calls.append("load")
        if len(calls) == 1:
            widgets.register("late", 3)

    widgets: Registry[int] = Registry("widget", load=load)
    assert widgets.get("late") == 3 and calls == ["load"]
    assert widgets.get("late") == 3 and calls == ["load"]  # known: no load
    assert "nope" not in widgets and calls == ["load", "load"]
    with pytest.raises(ValueError, match="unknown widget 'nope'; expected one of late"):
        widgets.get("nope")
    assert widgets.names() == ["late"]


def test_a_lookup_during_the_load_does_not_start_it_again() -> None:
    """A module that registers on import may look names up while the load imports it."""
    calls: list[str] = []

    def load() -> None:
        calls.append("load")
        assert "x" not in widgets  # would recurse without the guard
        widgets.register("x", 1)

    widgets: Registry[int] = Registry("widget", load=load)
    assert widgets.get("x") == 1 and calls == ["load"]


def test_the_project_registries_refuse_a_taken_name() -> None:
    from clusterformer.data.sample_spec import SampleSpec, register_sample_spec, sample_spec
    from clusterformer.models import ClusterFormer, register_architecture, register_backbone
    from clusterformer.models.registry import ARCHITECTURES
    from clusterformer.tasks import register_task, task_spec

    detection = task_spec("detection")
    data = sample_spec("detection")
    with pytest.raises(DuplicateNameError, match="task 'detection'"):
        register_task(dataclasses.replace(detection, primary_metric="bbox_AP50"))
    assert task_spec("detection") is detection and sample_spec("detection") is data  # untouched
    with pytest.raises(DuplicateNameError, match="task 'detection'"):
        register_sample_spec("detection", SampleSpec(formats=("coco",), fields=()))
    with pytest.raises(DuplicateNameError, match="architecture 'segmenter'"):
        register_architecture("segmenter", ARCHITECTURES.get("detector"))
    with pytest.raises(DuplicateNameError, match="backbone 'clusterformer-nano'"):
        register_backbone("clusterformer-nano", ClusterFormer)
    with pytest.raises(DuplicateNameError, match="backbone 'timm/'"):
        register_backbone("timm/", ClusterFormer)
