"""The registry: every registered method has a complete spec, and ``get`` returns the registered method."""

from __future__ import annotations

import attnzoo as az


def test_registry_specs_are_complete():
    specs = az.methods()
    assert {"softmax", "sigmoid"} <= set(specs)
    for name, spec in specs.items():
        assert spec.name == name and spec.paper and spec.summary and spec.patterns and spec.complexity
        assert az.get(name).spec is spec
