"""The shape of the tree, pinned: no import cycles, layers that import only downwards,
names that say what a part is."""
import numpy as np


def _eglp_imports():
    """eglp_dist module -> the eglp_dist modules it imports, at module level or inside functions."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "eglp_dist"
    mods = {}
    for p in root.rglob("*.py"):
        parts = p.relative_to(root.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    graph = {}
    for name, p in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("eglp_dist"):
                deps |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module
                         for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("eglp_dist")}
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def test_no_import_cycles_between_eglp_dist_modules():
    graph = _eglp_imports()
    cycles = []
    for start in graph:  # a path back to the start = a cycle through it
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    cycles.append(path)
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
    assert not cycles, cycles[:3]
    # the back-ends share their planning pieces through their own module, not the facade
    assert "eglp_dist.data.loader" not in graph["eglp_dist.data.pil"] | graph["eglp_dist.data.dali"]
    assert "eglp_dist.config" not in graph["eglp_dist.models.config"]


def test_the_pil_backend_is_named_for_what_it_is_and_its_old_name_still_works():
    import warnings

    import pytest

    from eglp_dist.data.config import DataConfig, backend_of

    assert DataConfig().backend == "pil"
    with pytest.warns(FutureWarning, match="data.backend=pil"):
        assert backend_of(DataConfig(backend="wds")) == "pil"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backend_of(DataConfig(backend="dali")) == "dali"


def test_the_layers_of_the_tree_import_only_downwards():
    """What the folders say: training's data code never reaches the offline tools (dataset
    folders -> shards), a recipe's part never imports a recipe, the runtime knows no method."""
    graph = _eglp_imports()
    recipes = {f"eglp_dist.methods.{m}" for m in ("base", "source_only", "uda", "pig", "eglp", "spn")}
    for module, deps in graph.items():
        if module.startswith("eglp_dist.data.") and not module.startswith("eglp_dist.data.offline"):
            assert not {d for d in deps if d.startswith("eglp_dist.data.offline")}, module
        if module.startswith("eglp_dist.methods.parts"):
            assert not deps & recipes, module
        if module.startswith("eglp_dist.runtime"):
            assert not {d for d in deps if d.startswith("eglp_dist.methods")}, module


def test_synthetic_scenes_content_rendering_and_files_live_apart():
    from eglp_dist.data import codecs
    from eglp_dist.data.offline import synth, synth_render, synth_scene

    graph = _eglp_imports()
    assert "eglp_dist.data.offline.synth_render" not in graph["eglp_dist.data.offline.synth_scene"]  # content knows no pixels
    assert "eglp_dist.data.offline.synth" not in graph["eglp_dist.data.offline.synth_render"]
    rgb = np.zeros((4, 5, 3), np.uint16)
    rgb[..., 0] = np.arange(20).reshape(4, 5) * 1000
    assert np.array_equal(codecs.decode_png16(codecs.encode_png16_rgb(rgb), "x.png"), rgb)  # lossless, 16 bits
    assert synth_render.STYLES == synth.STYLES and synth_scene.MIN_SIZE == synth.MIN_SIZE
