"""UDA building blocks (DAFormer/HRDA/MIC): pseudo-labels, ClassMix, strong augmentation,
ImageNet feature distance, MIC block masks. Each check compares with an independent
(slow, loop-based or hand-made) computation so that it fails when the identity breaks."""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from eglp_dist.methods.parts.classmix import class_masks, mix
from eglp_dist.methods.parts.feature_distance import downscale_label_ratio, feature_distance_loss
from eglp_dist.methods.parts.mic import block_mask
from eglp_dist.methods.parts.pseudo_label import pseudo_labels
from eglp_dist.methods.parts import strong_aug as sa
from eglp_dist.methods.parts.strong_aug import strong_augment
from dist_harness import run_ranks
from eglp_dist.config import PACKAGE_CONFIG_ROOT, load_config

MEAN = [123.675, 116.28, 103.53]
STD = [58.395, 57.12, 57.375]
IGNORE = 255


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def normalise(x01: torch.Tensor) -> torch.Tensor:
    m = torch.tensor(MEAN).view(1, 3, 1, 1)
    s = torch.tensor(STD).view(1, 3, 1, 1)
    return (x01 * 255.0 - m) / s


def denormalise(x: torch.Tensor) -> torch.Tensor:
    m = torch.tensor(MEAN).view(1, 3, 1, 1)
    s = torch.tensor(STD).view(1, 3, 1, 1)
    return (x * s + m) / 255.0


def blocky_seg(g: torch.Generator, b: int, h: int, w: int, k: int, cell: int = 4,
               ignore_share: float = 0.15) -> torch.Tensor:
    """Random labels made of cell x cell blobs, some of them ignored (255)."""
    low = torch.randint(0, k, (b, (h + cell - 1) // cell, (w + cell - 1) // cell), generator=g)
    low[torch.rand(low.shape, generator=g) < ignore_share] = IGNORE
    seg = low.repeat_interleave(cell, 1).repeat_interleave(cell, 2)[:, :h, :w]
    noise = torch.rand(seg.shape, generator=g) < 0.1                    # break some cells
    return torch.where(noise, torch.randint(0, k, seg.shape, generator=g), seg).contiguous()


# ------------------------------------------------------------------ pseudo-labels
def test_pseudo_labels_confidence_weight_and_labels():
    g = gen(0)
    b, k, h, w = 3, 5, 8, 10
    shares = [0.25, 0.5, 1.0]
    cls = torch.randint(0, k, (b, h, w), generator=g)
    logits = torch.zeros(b, k, h, w)
    confident = torch.zeros(b, h, w, dtype=torch.bool)
    for i, share in enumerate(shares):
        n = int(share * h * w)
        idx = torch.randperm(h * w, generator=g)[:n]
        confident[i].view(-1)[idx] = True
    # confident: +10 on the class (p ~ 0.9998); not: +1 on the class (p ~ 0.40 < 0.968)
    bump = torch.where(confident, torch.tensor(10.0), torch.tensor(1.0))
    logits.scatter_(1, cls[:, None], bump[:, None])
    logits += 0.01 * torch.randn(logits.shape, generator=g)

    label, weight, conf = pseudo_labels(logits, 0.968)
    assert label.dtype == torch.long and weight.dtype == torch.float32 and conf.dtype == torch.float32
    assert label.shape == (b, h, w) and weight.shape == (b, h, w) and conf.shape == (b,)
    assert torch.equal(label, cls)
    assert torch.allclose(conf, torch.tensor(shares), atol=0, rtol=0)
    for i in range(b):                                                    # one weight per image
        assert torch.all(weight[i] == conf[i])

    # independent loop: softmax of each pixel by hand
    p = torch.softmax(logits.double(), dim=1).max(dim=1).values
    for i in range(b):
        n_conf = sum(1 for v in p[i].flatten().tolist() if v >= 0.968)
        assert conf[i].item() == pytest.approx(n_conf / (h * w), abs=1e-7)

    # ignored rows: weight 0 there, the share still counts every pixel
    label2, weight2, conf2 = pseudo_labels(logits, 0.968, ignore_top=2, ignore_bottom=3)
    assert torch.equal(label2, label) and torch.equal(conf2, conf)
    assert torch.all(weight2[:, :2] == 0) and torch.all(weight2[:, h - 3:] == 0)
    assert torch.equal(weight2[:, 2:h - 3], weight[:, 2:h - 3])

    # half-precision teacher gives the same (softmax taken in float32)
    label3, _, conf3 = pseudo_labels(logits.half(), 0.968)
    assert torch.equal(label3, label) and torch.equal(conf3, conf)


def test_pseudo_labels_threshold_and_no_grad():
    logits = torch.tensor([[[[5.0, 2.0]], [[0.0, 0.0]]]], requires_grad=True)  # (1, 2, 1, 2)
    # max probs: sigmoid(5) = 0.9933 and sigmoid(2) = 0.8808
    _, _, c = pseudo_labels(logits, 0.968)
    assert c.item() == 0.5
    _, w, c = pseudo_labels(logits, 0.8)
    assert c.item() == 1.0 and not w.requires_grad
    _, _, c = pseudo_labels(logits, 0.995)
    assert c.item() == 0.0
    # the comparison is ">=": a pixel whose max prob is exactly the threshold is confident
    near = torch.tensor([[[[math.log(0.9685 / 0.0315), math.log(0.9675 / 0.0325)]], [[0.0, 0.0]]]])
    _, _, c = pseudo_labels(near, 0.968)
    assert c.item() == 0.5
    p = torch.softmax(near.float(), dim=1).amax(dim=1)[0, 0, 0].item()
    _, _, c = pseudo_labels(near, p)
    assert c.item() == 0.5


# ------------------------------------------------------------------ ClassMix
def test_class_masks_whole_classes_half_rounded_up():
    g = gen(1)
    seg = blocky_seg(g, 6, 24, 32, k=7)
    seg[0] = 3                                                            # one class: chosen
    seg[1, :, :16], seg[1, :, 16:] = 2, IGNORE                            # two values: one chosen
    mask = class_masks(seg, gen(5))
    assert mask.shape == (6, 1, 24, 32) and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    for b in range(seg.shape[0]):
        present = seg[b].unique().tolist()                               # 255 included
        m = mask[b, 0] == 1
        chosen = seg[b][m].unique().tolist()
        n = len(present)
        assert len(chosen) == math.ceil(n / 2) == (n + n % 2) // 2
        assert set(chosen) <= set(present)
        for c in present:                                                # whole classes only
            on = m[seg[b] == c]
            assert bool(on.all()) or not bool(on.any())
        # the mask is exactly the union of the chosen classes
        union = torch.zeros_like(m)
        for c in chosen:
            union |= seg[b] == c
        assert torch.equal(union, m)
    assert torch.all(mask[0] == 1)


def test_class_masks_ignore_value_is_a_candidate():
    seg = torch.full((1, 4, 4), IGNORE)
    seg[0, :2] = 1
    picked = Counter()
    g = gen(2)
    for _ in range(40):
        m = class_masks(seg, g)[0, 0]
        picked[int(seg[0][m == 1].unique().item())] += 1
    assert set(picked) == {1, IGNORE}                                    # as DAFormer: 255 can be pasted


def test_class_masks_seeded():
    seg = blocky_seg(gen(3), 4, 32, 32, k=12)
    a = class_masks(seg, gen(7))
    b = class_masks(seg, gen(7))
    c = class_masks(seg, gen(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # the generator is consumed: two consecutive draws differ
    g = gen(7)
    assert not torch.equal(class_masks(seg, g), class_masks(seg, g))


def test_mix_image_label_weight_consistent():
    g = gen(4)
    b, h, w = 4, 16, 20
    seg_src = blocky_seg(g, b, h, w, k=6)
    seg_tgt = torch.randint(0, 6, (b, h, w), generator=g)
    img_src, img_tgt = torch.randn(b, 3, h, w, generator=g), torch.randn(b, 3, h, w, generator=g)
    w_src, w_tgt = torch.ones(b, h, w), torch.rand(b, h, w, generator=g)
    mask = class_masks(seg_src, g)
    img, lbl, wt = mix(mask, img_src, img_tgt), mix(mask, seg_src, seg_tgt), mix(mask, w_src, w_tgt)
    assert img.dtype == torch.float32 and lbl.dtype == torch.long and wt.dtype == torch.float32
    assert img.shape == img_src.shape and lbl.shape == seg_src.shape and wt.shape == w_src.shape
    for i in range(b):                                                   # pixel loop
        for y in range(h):
            for x in range(w):
                src = mask[i, 0, y, x].item() == 1
                assert torch.equal(img[i, :, y, x], (img_src if src else img_tgt)[i, :, y, x])
                assert lbl[i, y, x].item() == (seg_src if src else seg_tgt)[i, y, x].item()
                assert wt[i, y, x].item() == (w_src if src else w_tgt)[i, y, x].item()
    # the source label where the mask is 1 is exactly the chosen classes
    assert torch.equal(lbl[mask[:, 0] == 1], seg_src[mask[:, 0] == 1])


# ------------------------------------------------------------------ strong augmentation
def _images(seed: int, b: int = 4, h: int = 32, w: int = 40) -> torch.Tensor:
    x01 = torch.rand(b, 3, h, w, generator=gen(seed))
    x01[:, :, :2] = 0.0                                                   # hit the range ends
    x01[:, :, -2:] = 1.0
    return normalise(x01)


def test_strong_augment_deterministic_and_consumes_fixed_draws():
    x = _images(0)
    g1, g2 = gen(11), gen(11)
    a = strong_augment(x, MEAN, STD, g1, jitter_p=0.5, blur_p=0.5)
    b = strong_augment(x, MEAN, STD, g2, jitter_p=0.5, blur_p=0.5)
    assert torch.equal(a, b) and a.shape == x.shape and a.dtype == x.dtype
    ref = gen(11)
    torch.rand((4, 11), generator=ref)                                   # 11 uniforms per image
    assert torch.equal(g1.get_state(), ref.get_state())
    c = strong_augment(x, MEAN, STD, gen(12), jitter_p=0.5, blur_p=0.5)
    assert not torch.equal(a, c)


def test_strong_augment_p0_is_identity_and_untouched_images_exact():
    x = _images(1)
    assert torch.equal(strong_augment(x, MEAN, STD, gen(0), jitter_p=0.0, blur_p=0.0), x)
    params = sa.sample_strong_params(4, gen(3), jitter_p=0.8, blur_p=0.5)
    params["jitter"] = torch.tensor([True, False, False, True])
    params["blur"] = torch.tensor([False, False, True, True])
    y = sa.apply_strong_params(x, MEAN, STD, params)
    assert torch.equal(y[1], x[1])                                       # neither op: bit-identical
    assert not torch.equal(y[0], x[0]) and not torch.equal(y[2], x[2])


def test_strong_augment_probabilities_and_kornia_ranges():
    p = sa.sample_strong_params(20000, gen(4), jitter_p=0.8, jitter_strength=0.2, blur_p=0.5)
    assert p["jitter"].float().mean().item() == pytest.approx(0.8, abs=0.015)
    assert p["blur"].float().mean().item() == pytest.approx(0.5, abs=0.015)
    for key, lo, hi in [("brightness", 0.8, 1.2), ("contrast", 0.8, 1.2), ("saturation", 0.8, 1.2),
                        ("hue", -0.2, 0.2), ("sigma", 0.15, 1.15)]:
        v = p[key]
        assert v.min().item() >= lo - 1e-6 and v.max().item() <= hi + 1e-6
        assert v.min().item() < lo + 0.01 and v.max().item() > hi - 0.01     # fills the range
    orders = Counter(tuple(o) for o in p["order"].tolist())
    assert len(orders) == 24 and all(sorted(o) == [0, 1, 2, 3] for o in orders)
    # kornia clamps: brightness to [0, 2], contrast/saturation below at 0, hue to [-0.5, 0.5]
    q = sa.sample_strong_params(5000, gen(5), jitter_strength=1.5)
    assert q["brightness"].min() >= 0 and q["brightness"].max() <= 2 and q["brightness"].max() > 1.95
    assert q["contrast"].min() >= 0 and q["contrast"].max() > 2.4
    assert q["hue"].min() >= -0.5 and q["hue"].max() <= 0.5 and q["hue"].max() > 0.49


def test_strong_augment_strength0_jitter_is_identity():
    x = _images(2)
    y = strong_augment(x, MEAN, STD, gen(0), jitter_p=1.0, jitter_strength=0.0, blur_p=0.0)
    assert torch.allclose(y, x, atol=2e-5, rtol=0)


def test_strong_augment_output_in_valid_range():
    x = _images(3, b=8)
    lo = normalise(torch.zeros(1, 3, 1, 1))
    hi = normalise(torch.ones(1, 3, 1, 1))
    for seed in range(3):
        y = strong_augment(x, MEAN, STD, gen(seed), jitter_p=1.0, jitter_strength=0.5, blur_p=1.0)
        assert torch.all(y >= lo - 1e-5) and torch.all(y <= hi + 1e-5)


def test_brightness_only_matches_hand_computation():
    x = _images(4, b=2)
    params = sa.sample_strong_params(2, gen(0))
    params.update(jitter=torch.tensor([True, True]), blur=torch.tensor([False, False]),
                  brightness=torch.tensor([1.15, 0.9]), contrast=torch.ones(2),
                  saturation=torch.ones(2), hue=torch.zeros(2))
    y = sa.apply_strong_params(x, MEAN, STD, params)
    x01 = denormalise(x)
    expect = torch.stack([normalise((x01[0:1] + 0.15).clamp(0, 1))[0],
                          normalise((x01[1:2] - 0.1).clamp(0, 1))[0]])
    assert torch.allclose(y, expect, atol=1e-4, rtol=0)
    # and the op itself, exactly: additive and clamped (kornia 0.5.8)
    v = torch.tensor([0.0, 0.3, 0.95, 1.0]).view(1, 1, 1, 4).expand(1, 3, 1, 4)
    assert torch.equal(sa.adjust_brightness(v, 0.1)[0, 0, 0],
                       torch.tensor([0.1, 0.3 + 0.1, 1.0, 1.0], dtype=torch.float32))
    assert torch.equal(sa.adjust_contrast(v, 2.0)[0, 0, 0], torch.tensor([0.0, 0.6, 1.0, 1.0]))


def test_hue_rotation_and_saturation():
    x = torch.rand(3, 3, 16, 16, generator=gen(6))
    assert torch.allclose(sa.adjust_hue(x, 0.0), x, atol=2e-6)
    assert torch.allclose(sa.adjust_hue(x, 1.0), x, atol=2e-6)           # a full turn
    assert torch.allclose(sa.adjust_hue(x, -1.0), x, atol=2e-6)
    assert torch.allclose(sa.adjust_hue(sa.adjust_hue(x, 0.3), -0.3), x, atol=1e-5)
    assert torch.allclose(sa.adjust_hue(sa.adjust_hue(x, 0.5), 0.5), x, atol=1e-5)
    # direction and size: red + 1/3 turn = green, + 2/3 = blue; brightness V and S are kept
    red = torch.tensor([0.8, 0.2, 0.2]).view(1, 3, 1, 1)
    assert torch.allclose(sa.adjust_hue(red, 1 / 3).flatten(), torch.tensor([0.2, 0.8, 0.2]), atol=1e-6)
    assert torch.allclose(sa.adjust_hue(red, -1 / 3).flatten(), torch.tensor([0.2, 0.2, 0.8]), atol=1e-6)
    hsv, hsv2 = sa.rgb_to_hsv(x), sa.rgb_to_hsv(sa.adjust_hue(x, 0.17))
    assert torch.allclose(hsv[:, 1:], hsv2[:, 1:], atol=1e-5)
    dh = torch.remainder(hsv2[:, 0] - hsv[:, 0] + 0.5, 1.0) - 0.5        # circular difference
    assert torch.allclose(dh[hsv[:, 1] > 0.05], torch.tensor(0.17), atol=1e-4)
    # saturation closed form == kornia's HSV route (scale S, clamp to [0, 1])
    for f in (0.0, 0.6, 1.0, 1.4, 5.0):
        s2 = (hsv[:, 1] * f).clamp(0, 1)
        via_hsv = sa.hsv_to_rgb(torch.stack([hsv[:, 0], s2, hsv[:, 2]], dim=1))
        assert torch.allclose(sa.adjust_saturation(x, f), via_hsv, atol=1e-5)
    grey = torch.full((1, 3, 2, 2), 0.4)
    assert torch.equal(sa.adjust_saturation(grey, 1.7), grey)


def test_blur_kernel_rule_mean_and_high_frequency():
    # DAFormer: floor(ceil(0.1 n) - 0.5 + ceil(0.1 n) % 2), numpy float64 arithmetic
    for n in (8, 20, 30, 64, 100, 512, 1024, 1080):
        c = math.ceil(0.1 * n)
        assert sa.blur_kernel_size(n) == math.floor(c - 0.5 + c % 2)
        assert sa.blur_kernel_size(n) % 2 == 1
    assert (sa.blur_kernel_size(512), sa.blur_kernel_size(1024), sa.blur_kernel_size(30)) == (51, 103, 3)

    x = 1.5 + 0.5 * torch.randn(3, 3, 64, 80, generator=gen(7))
    y = strong_augment(x, MEAN, STD, gen(1), jitter_p=0.0, blur_p=1.0, blur_sigma=(0.8, 1.1))
    # reflect padding (kornia's default border): the mean moves only at the borders, slightly
    # (zero padding would pull the 1.5 offset down by ~0.05 here)
    assert torch.allclose(y.mean(dim=(2, 3)), x.mean(dim=(2, 3)), atol=0.01)

    def hf(t):
        return ((t[..., 1:, :] - t[..., :-1, :]) ** 2).sum() + ((t[..., :, 1:] - t[..., :, :-1]) ** 2).sum()
    assert hf(y) < 0.5 * hf(x)

    # against a direct 2-D convolution loop with reflect indexing at one border pixel
    sigma = torch.tensor([0.9])
    hh, ww = 40, 50
    img = torch.rand(1, 1, hh, ww, generator=gen(8))
    out = sa.gaussian_blur(img, sigma)
    ky, kx = sa.blur_kernel_size(hh), sa.blur_kernel_size(ww)
    assert (ky, kx) == (3, 5)
    gy = [math.exp(-(i - ky // 2) ** 2 / (2 * 0.9 ** 2)) for i in range(ky)]
    gx = [math.exp(-(i - kx // 2) ** 2 / (2 * 0.9 ** 2)) for i in range(kx)]

    def reflect(i, n):
        return -i if i < 0 else (2 * (n - 1) - i if i >= n else i)
    for (r, c) in [(0, 0), (hh - 1, ww - 1), (10, 15), (0, 17), (25, 1)]:
        acc = sum(gy[a] * gx[b] * img[0, 0, reflect(r + a - ky // 2, hh), reflect(c + b - kx // 2, ww)].item()
                  for a in range(ky) for b in range(kx))
        assert out[0, 0, r, c].item() == pytest.approx(acc / (sum(gy) * sum(gx)), abs=1e-6)


# ------------------------------------------------------------------ feature distance
def _downscale_loop(seg, scale, min_ratio, k, ignore=IGNORE):
    b, h, w = seg.shape
    out = torch.empty(b, h // scale, w // scale, dtype=torch.long)
    for i in range(b):
        for y in range(h // scale):
            for x in range(w // scale):
                cell = seg[i, y * scale:(y + 1) * scale, x * scale:(x + 1) * scale].flatten().tolist()
                cnt = Counter(k if v == ignore else v for v in cell)
                best = min(cnt, key=lambda c: (-cnt[c], c))              # most frequent, lowest id
                share = cnt[best] / (scale * scale)
                out[i, y, x] = ignore if (best == k or share < min_ratio) else best
    return out


@pytest.mark.parametrize("scale,min_ratio,size", [(2, 0.75, (16, 20)), (3, 0.5, (17, 22)),
                                                  (4, 0.75, (16, 16)), (4, 0.0, (18, 21))])
def test_downscale_label_ratio_matches_loop(scale, min_ratio, size):
    g = gen(scale * 10 + int(min_ratio * 4))
    seg = blocky_seg(g, 2, *size, k=6, cell=scale)
    got = downscale_label_ratio(seg, scale, min_ratio, 6)
    assert got.dtype == torch.long and got.shape == (2, size[0] // scale, size[1] // scale)
    assert torch.equal(got, _downscale_loop(seg, scale, min_ratio, 6))
    assert torch.equal(downscale_label_ratio(seg[:, None], scale, min_ratio, 6), got)   # (B, 1, H, W)


def test_downscale_label_ratio_hand_example():
    seg = torch.tensor([[[1, 1, 2, 2],
                         [1, 1, 2, 5],
                         [3, 3, 255, 255],
                         [4, 4, 255, 7]]])
    # cells: all 1 -> 1; 3/4 of 2 -> 2 (0.75 >= 0.75); 2+2 -> ignore; 3/4 ignored -> ignore
    assert downscale_label_ratio(seg, 2, 0.75, 19).tolist() == [[[1, 2], [255, 255]]]
    # at 0.5 the tie 3/4 goes to the lower class id (DAFormer's max); ignore majority stays ignored
    assert downscale_label_ratio(seg, 2, 0.5, 19).tolist() == [[[1, 2], [3, 255]]]
    assert downscale_label_ratio(seg, 4, 0.25, 19).tolist() == [[[1]]]   # 1 and 255 both 4/16
    assert downscale_label_ratio(seg, 4, 0.3, 19).tolist() == [[[255]]]


def test_feature_distance_hand_computation_and_grad():
    seg = torch.tensor([[[6, 6, 0, 0],
                         [6, 6, 0, 0],
                         [255, 255, 11, 11],
                         [255, 255, 11, 13]]])                             # -> [[6, 0], [255, 11]]
    feat = torch.zeros(1, 2, 2, 2)
    feat[0, :, 0, 0] = torch.tensor([3.0, 4.0])                           # |.| = 5   (class 6)
    feat[0, :, 0, 1] = torch.tensor([1.0, 1.0])                           # road: not a thing
    feat[0, :, 1, 0] = torch.tensor([7.0, 0.0])                           # ignore
    feat[0, :, 1, 1] = torch.tensor([0.0, 3.0])                           # |. - ref| = 2 (class 11)
    ref = torch.zeros(1, 2, 2, 2)
    ref[0, :, 1, 1] = torch.tensor([0.0, 1.0])
    ref.requires_grad_(True)
    feat.requires_grad_(True)
    loss = feature_distance_loss(feat, ref, seg)
    assert loss.item() == pytest.approx((5.0 + 2.0) / 2)
    loss.backward()
    expect = torch.zeros(1, 2, 2, 2)
    expect[0, :, 0, 0] = torch.tensor([0.6, 0.8]) / 2                     # unit vector / count
    expect[0, :, 1, 1] = torch.tensor([0.0, 1.0]) / 2
    assert torch.allclose(feat.grad, expect)
    assert ref.grad is None                                               # ImageNet features detached

    # classes=None: every feature pixel
    all_px = feature_distance_loss(feat.detach(), ref.detach(), seg, classes=None)
    assert all_px.item() == pytest.approx((5.0 + math.sqrt(2) + 7.0 + 2.0) / 4)
    # a custom class list
    road = feature_distance_loss(feat.detach(), ref.detach(), seg, classes=[0])
    assert road.item() == pytest.approx(math.sqrt(2))


def test_feature_distance_pooled_over_batch_matches_loop():
    g = gen(9)
    seg = blocky_seg(g, 3, 32, 32, k=19, cell=8, ignore_share=0.1)
    feat = torch.randn(3, 5, 4, 4, generator=g, requires_grad=True)
    ref = torch.randn(3, 5, 4, 4, generator=g)
    loss = feature_distance_loss(feat, ref, seg)
    lbl = _downscale_loop(seg, 8, 0.75, 19)
    things = {6, 7, 11, 12, 13, 14, 15, 16, 17, 18}
    d = [torch.linalg.norm(feat[i, :, y, x] - ref[i, :, y, x]).item()
         for i in range(3) for y in range(4) for x in range(4) if lbl[i, y, x].item() in things]
    assert len(d) > 0
    assert loss.item() == pytest.approx(sum(d) / len(d), rel=1e-5)


def test_feature_distance_empty_mask_is_connected_zero():
    seg = torch.zeros(2, 16, 16, dtype=torch.long)                       # road only: no thing
    feat = torch.randn(2, 4, 4, 4, generator=gen(10), requires_grad=True)
    ref = torch.randn(2, 4, 4, 4, generator=gen(11))
    loss = feature_distance_loss(feat, ref, seg)
    assert loss.item() == 0.0 and loss.requires_grad and loss.grad_fn is not None
    (0.005 * loss).backward()
    assert feat.grad is not None and torch.equal(feat.grad, torch.zeros_like(feat))
    with pytest.raises(ValueError):                                       # label/feature size mismatch
        feature_distance_loss(feat, ref, torch.zeros(2, 16, 20, dtype=torch.long))


# ------------------------------------------------------------------ MIC block mask
def test_block_mask_blocks_share_and_seed():
    g = gen(12)
    m = block_mask(3, 128, 192, 64, 0.7, generator=g)
    assert m.shape == (3, 1, 128, 192) and m.dtype == torch.float32
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    blocks = m.view(3, 1, 2, 64, 3, 64)
    assert torch.all(blocks.amax(dim=(3, 5)) == blocks.amin(dim=(3, 5)))  # constant per block
    # MIC: visible iff U > ratio, the same uniforms in (B, 1, rows, cols) order
    ref = gen(12)
    u = torch.rand((3, 1, 2, 3), generator=ref)
    assert torch.equal(blocks[:, :, :, 0, :, 0], (u > 0.7).float())
    assert torch.equal(g.get_state(), ref.get_state())                  # exactly B*rows*cols draws

    big = block_mask(64, 256, 256, 16, 0.7, generator=gen(13))          # 16384 blocks
    assert big.mean().item() == pytest.approx(0.3, abs=0.02)
    assert torch.equal(block_mask(2, 64, 64, 16, 0.7, generator=gen(14)),
                       block_mask(2, 64, 64, 16, 0.7, generator=gen(14)))
    assert not torch.equal(block_mask(2, 64, 64, 16, 0.7, generator=gen(14)),
                           block_mask(2, 64, 64, 16, 0.7, generator=gen(15)))
    assert torch.all(block_mask(1, 32, 32, 8, 1.0, generator=gen(0)) == 0)   # everything hidden
    with pytest.raises(ValueError):
        block_mask(1, 32, 32, 8, 0.7)


def test_block_mask_non_multiple_follows_mic_resize():
    # MIC: round(H / block) grid, nearest resize to (H, W); 100 / 64 -> 2 rows of 50 pixels
    m = block_mask(2, 100, 40, 64, 0.5, generator=gen(16))
    u = torch.rand((2, 1, 2, 1), generator=gen(16))
    grid = (u > 0.5).float()
    for y in range(100):
        assert torch.equal(m[:, :, y, :], grid[:, :, y // 50, :].expand(2, 1, 40))
    assert block_mask(1, 20, 20, 64, 0.0, generator=gen(1)).shape == (1, 1, 20, 20)  # >= 1 block
    # 100 / 32 -> 3 rows (round), 70 / 32 -> 2 cols; nearest: source index floor(y * rows / H)
    m = block_mask(4, 100, 70, 32, 0.5, generator=gen(17))
    grid = (torch.rand((4, 1, 3, 2), generator=gen(17)) > 0.5).float()
    for y in range(100):
        for x in range(70):
            assert torch.equal(m[:, :, y, x], grid[:, :, y * 3 // 100, x * 2 // 70])


# ------------------------------------------------------------------ CUDA tensors, CPU generator
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_ops_on_cuda_match_cpu():
    dev = torch.device("cuda")
    x = _images(5)
    assert torch.allclose(strong_augment(x.to(dev), MEAN, STD, gen(0), jitter_p=1.0, blur_p=1.0).cpu(),
                          strong_augment(x, MEAN, STD, gen(0), jitter_p=1.0, blur_p=1.0), atol=1e-4)
    seg = blocky_seg(gen(1), 3, 32, 32, k=19, cell=8)
    assert torch.equal(class_masks(seg.to(dev), gen(2)).cpu(), class_masks(seg, gen(2)))
    assert class_masks(seg.to(dev), gen(2)).device.type == "cuda"
    assert torch.equal(downscale_label_ratio(seg.to(dev), 8, 0.75, 19).cpu(),
                       downscale_label_ratio(seg, 8, 0.75, 19))
    feat = torch.randn(3, 4, 4, 4, generator=gen(3))
    ref = torch.randn(3, 4, 4, 4, generator=gen(4))
    assert torch.allclose(feature_distance_loss(feat.to(dev), ref.to(dev), seg.to(dev)).cpu(),
                          feature_distance_loss(feat, ref, seg), atol=1e-5)
    lab, w, c = pseudo_labels(torch.randn(2, 19, 8, 8, generator=gen(5)).to(dev), 0.5, 1, 1)
    assert lab.device.type == w.device.type == c.device.type == "cuda"
    assert block_mask(2, 64, 64, 16, 0.7, generator=gen(6), device=dev).device.type == "cuda"


def test_pseudo_label_margins_cover_left_and_right_columns():
    """PIG's margins [top, bottom, left, right] = [30, 240, 30, 30]: columns too."""
    logits = torch.zeros(1, 19, 8, 10)
    logits[:, 0] = 10.0
    _, weight, conf = pseudo_labels(logits, 0.5, ignore_top=1, ignore_bottom=2, ignore_left=3, ignore_right=1)
    assert conf.item() == 1.0
    expected = torch.zeros(8, 10)
    expected[1:6, 3:9] = 1.0
    assert torch.equal(weight[0], expected)


def _mic_backward(env, weight):
    from eglp_dist.methods import build_method

    cfg = load_config(PACKAGE_CONFIG_ROOT / "demo" / "tiny_uda.yaml",
                      ["method.mic.enabled=true", f"method.mic.weight={weight}", "method.pseudo.threshold=0.01",
                       "data.source.crop_size=[64,64]",
                       "data.target.crop_size=[64,64]"])
    method = build_method(cfg, env, torch.device("cpu"))
    seen = []
    original = method.student.backward
    method.student.backward = lambda loss: (seen.append(loss.detach().clone()), original(loss))[1]
    forwards = []
    inner = method.train_forward

    def spy(engine, images, seg, w=None, prefix="src"):
        out = inner(engine, images, seg, w, prefix)
        forwards.append((prefix, {k: v.detach().clone() for k, v in out[1].items()}))
        return out

    method.train_forward = spy
    g = torch.Generator().manual_seed(0)
    batches = {"source": {"img": torch.randn(2, 3, 64, 64, generator=g), "seg": torch.randint(0, 19, (2, 64, 64), generator=g)},
               "target": {"img": torch.randn(2, 3, 64, 64, generator=g)}}
    method.step(batches, 0)
    (_, masked), = [f for f in forwards if f[0] == "masked"]
    return seen[-1], masked


def test_mic_weight_scales_only_the_masked_decode_loss():
    """MIC (masking_consistency_module.py) multiplies `decode.loss_seg` by mask_lambda: HRDA's
    fused term, not its detail term."""
    (loss, parts), = run_ranks(_mic_backward, 1, args=(3.0,))
    assert parts["loss_seg"] > 0 and parts["loss_seg_hr"] > 0  # (threshold 0.01: pseudo weights 1)
    torch.testing.assert_close(loss, 3.0 * parts["loss_seg"] + parts["loss_seg_hr"])
