"""The paper-size projection's two measurements: which network passes a step makes (recorded
from the real step, not listed by hand) and their FLOPs on meta-device networks."""
import torch

from eglp_dist.runners import bench_project, bench_step
from eglp_dist.config import PACKAGE_CONFIG_ROOT, load_config
from eglp_dist.runtime.env import DistEnv


SMALL = ["data.source.crop_size=[64,64]", "data.target.crop_size=[64,64]", "data.prompt.crop_size=[64,64]"]


def _passes(name):
    from eglp_dist.methods import build_method

    cfg = load_config(str(PACKAGE_CONFIG_ROOT / "demo" / "tiny_eglp.yaml"), [f"method.name={name}", *SMALL])
    method = build_method(cfg, DistEnv(), torch.device("cpu"))
    batches = {s: bench_step.scene_batch(getattr(cfg.data, s), cfg.data, bench_step.STYLES[s], "cpu", 0, 0,
                                         s in method.ground_truth_streams) for s in method.streams}
    return cfg, [(net, call, trained) for net, call, _, trained in bench_project.record_calls(method, batches)]


def test_the_recorded_passes_are_the_recipes_networks_and_which_of_them_learn():
    _, uda = _passes("uda")
    assert sorted(uda) == sorted([("student", "forward_train", True), ("student", "forward_train", True),
                                  ("teacher", "predict", False)])
    _, eglp = _passes("eglp")
    assert sorted(eglp) == sorted(uda + [("nfnet", "forward_train", True), ("nfnet", "forward_train", True),
                                         ("nfnet_teacher", "predict", False)])


def _counts(model, call, device):
    from torch.utils.flop_counter import FlopCounterMode

    kwargs = {"generator": torch.Generator().manual_seed(0)} if call == "forward_train" else {}
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        getattr(model, call)(torch.randn(2, 3, 128, 128, device=device), **kwargs)
    by_op = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    return {"conv": by_op.get("aten.convolution", 0),
            "linear": by_op.get("aten.addmm", 0) + by_op.get("aten.mm", 0),
            "attention": by_op.get("aten.bmm", 0)}


def test_meta_device_flops_are_the_real_networks_flops():
    """Convolutions and linear layers count alike on a real CPU network and on the meta one;
    the meta count also holds attention's matrix products, which CPU's fused attention
    kernel hides from torch's counter."""
    from eglp_dist.models import build_segmentor

    cfg = load_config(str(PACKAGE_CONFIG_ROOT / "demo" / "tiny_eglp.yaml"), [])
    real = build_segmentor(cfg.model)
    with torch.device("meta"):
        meta = build_segmentor(cfg.model)
    for call in ("forward_train", "predict"):
        on_cpu, on_meta = _counts(real, call, "cpu"), _counts(meta, call, "meta")
        assert on_cpu["conv"] == on_meta["conv"] > 0 and on_cpu["linear"] == on_meta["linear"] > 0, call
        assert on_meta["attention"] > 0
        assert bench_project.forward_flops(cfg.model, call, (2, 3, 128, 128)) == sum(on_meta.values())
