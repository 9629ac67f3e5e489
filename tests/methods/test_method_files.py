"""How method files are written: every implementation is a named module-level function, one hop from its name."""

from __future__ import annotations

import sys

import pytest

import attnzoo  # noqa: F401  (registers every method)
from attnzoo.cli import main, where
from attnzoo.registry import all_methods


@pytest.mark.parametrize("method", all_methods(), ids=lambda m: m.name)
def test_implementations_are_module_level_functions(method) -> None:
    """The reference and every backend attnzoo ships are functions defined at module level (no closures) in the
    method's own file (the reference's module, under ``attnzoo.methods``) or in ``attnzoo.kernels``, reachable there
    by their name. (Backends other packages register are theirs to write.)"""
    home = method.reference.__module__
    assert home.startswith("attnzoo.methods."), home
    for backend in ("reference", *(b.name for b in method.backends)):
        fn = method.backend(backend).fn
        if not fn.__module__.startswith("attnzoo."):
            continue
        where = f"{method.name}/{backend}: {fn.__module__}.{fn.__qualname__}"
        assert "<locals>" not in fn.__qualname__ and "." not in fn.__qualname__, where
        assert fn.__module__ == home or fn.__module__.startswith("attnzoo.kernels."), where
        assert getattr(sys.modules[fn.__module__], fn.__qualname__) is fn, where


def test_info_names_each_backend_function_and_its_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "neighborhood"]) == 0
    out = capsys.readouterr().out
    for backend, function in (("torch", "torch_tiled"), ("flex", "flex_block_mask"), ("reference", "reference")):
        line = next(row for row in out.splitlines() if row.split()[:1] == [backend])
        name, place = line.split()[1:]
        assert name == f"attnzoo.methods.structured.neighborhood.{function}"
        path, number = place.rsplit(":", 1)
        assert path.endswith("attnzoo/methods/structured/neighborhood.py")
        assert int(number) > 0


def test_where_points_at_the_def_line() -> None:
    from attnzoo.methods.structured import neighborhood

    name, place = where(neighborhood.torch_tiled)
    path, number = place.rsplit(":", 1)
    assert name == "attnzoo.methods.structured.neighborhood.torch_tiled"
    assert neighborhood.__file__.replace("\\", "/").endswith(path.removeprefix("src/"))
    with open(neighborhood.__file__) as f:
        assert f.read().splitlines()[int(number) - 1].startswith("def torch_tiled(")
