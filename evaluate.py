"""Measure how real and how new fake kanji are: FID, KID, precision/recall and the near-copy rate.

    python evaluate.py ddpm runs/ddpm_kanji/ckpt.pt --n 2000     # samples with the default sampler
    python evaluate.py --images samples/ --json eval.json        # a folder of PNGs (or one grid PNG)
    python evaluate.py --calibrate                               # the README's calibration table
    python evaluate.py --train-features                          # retrain kanji_features.pt

Realism is measured in the embedding space of a small CNN the project trains itself (Inception weights
cannot be downloaded here and see the wrong kind of image): it learned kanji identity from Noto Sans JP
renders under heavy augmentation and is tested on Noto Serif JP renders it never saw. Its 256-d
embedding gives FID and KID (with their spread over subsets) and k-NN precision and recall.
Novelty is measured on pixels: the closest training glyph of every sample by binarized IoU, best over
shifts of up to 2 px; a sample above COPY_IOU is a near copy (see the README for the calibration).
"""
import argparse
import json
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import ddpm
import sample

WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kanji_features.pt")
FEATURES_VERSION = 1  # bump when kanji_features.pt changes meaning: numbers of two versions do not compare
COPY_IOU = 0.8        # closest IoU above this = near copy: above it, pairs of distinct kanji differ by one small stroke
COPY_SHIFT = 2        # IoU is the best over shifts of up to this many pixels in x and y
CANDIDATES = 64       # training glyphs per sample whose exact IoU is computed (picked by blurred-glyph cosine)
PR_K = 3              # neighbours that define the k-NN manifolds of precision and recall (Kynkaanniemi 2019)
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000


# ----------------------------------------------------------------------------------------------------
# The feature network

def prepare(x, size):
    """(N, C, H, W) uint8 or [0, 1] float, ink bright -> (N, 1, size, size) float in [0, 1]."""
    x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
    if x.shape[1] == 3:
        x = x.mean(1, keepdim=True)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x


class FeatureNet(nn.Module):
    """Kanji glyph (N, 1, S, S) in [0, 1], any S -> embedding (N, dim).

    The glyph is resized to `size` (32) and standardized; conv stages at 32, 16 and 8 px (width, 2w, 4w
    channels) are max-pooled to 4x4, flattened (where a component sits matters for a kanji, so no
    global pooling) and mapped to `dim` by a linear layer with BatchNorm: the embedding of the metrics.
    """

    def __init__(self, size=32, width=32, dim=256):
        super().__init__()
        self.size = size

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        w = width
        self.convs = nn.Sequential(
            *block(1, w), nn.MaxPool2d(2),                        # (N, w, 16, 16)
            *block(w, 2 * w), *block(2 * w, 2 * w), nn.MaxPool2d(2),      # (N, 2w, 8, 8)
            *block(2 * w, 4 * w), *block(4 * w, 4 * w), nn.MaxPool2d(2),  # (N, 4w, 4, 4)
        )
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * (size // 8) ** 2, dim, bias=False),
                                   nn.BatchNorm1d(dim))
        self.register_buffer("mean", torch.tensor(0.0))  # pixel statistics of the training renders
        self.register_buffer("std", torch.tensor(1.0))

    def forward(self, x):
        x = (prepare(x, self.size) - self.mean) / self.std
        return self.embed(self.convs(x))


def load_features(path=WEIGHTS, device="cpu"):
    """The committed trunk (no classifier head) in eval mode, plus the dict it came from."""
    if not os.path.isfile(path):
        raise data.GanjiError(f"feature weights not found: {path} (python evaluate.py --train-features writes them)")
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
        assert isinstance(d, dict) and "state_dict" in d
    except Exception:
        raise data.GanjiError(f"{path} is not a readable kanji feature file")
    if d.get("version") != FEATURES_VERSION:
        raise data.GanjiError(f"{path} has feature version {d.get('version')}; this GANji reads {FEATURES_VERSION}")
    net = FeatureNet(d["input_size"], d["width"], d["dim"])
    net.load_state_dict(d["state_dict"])
    return net.eval().to(device), d


@torch.no_grad()
def features(net, x, batch_size=500):
    """(N, C, H, W) uint8 or [0, 1] float, ink bright -> (N, dim) float32 on the CPU, in fp32."""
    device = next(net.parameters()).device
    return torch.cat([net(chunk.to(device)).float().cpu() for chunk in x.split(batch_size)])


# ----------------------------------------------------------------------------------------------------
# Training the feature network: Sans renders, batched tensor augmentation, tested on Serif renders

def blur(x, sigma):
    """Gaussian blur of square (N, C, S, S) images; sigma is a float or one per image (N,).

    Done as two matmuls with (S, S) kernel matrices (rows normalized): on a CPU this is several times
    faster than a one-channel conv2d, and it allows a different sigma for every image of a batch.
    """
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).clamp_min(1e-3).view(-1, 1, 1, 1)
    i = torch.arange(x.shape[-1], dtype=x.dtype, device=x.device)
    k = torch.exp(-(i[:, None] - i[None]) ** 2 / (2 * s ** 2))  # (N or 1, 1, S, S)
    k = k / k.sum(-1, keepdim=True)
    return k @ x @ k.transpose(-1, -2)  # blur along H, then along W


def augment(x, g):
    """(B, 1, H, W) [0, 1] glyphs -> the same kanji as another font might draw them, all as batched ops.

    Random affine (rotation, shear, per-axis scale, shift) by affine_grid/grid_sample; stroke weight by
    max-pool dilation or min-pool erosion of random strength along each axis; then a random blur.
    `g` is a CPU generator, so the same seed gives the same distortions on any device.
    """
    B, dev = len(x), x.device
    u = lambda: (torch.rand(B, generator=g) * 2 - 1).to(dev)  # (B,) uniform in [-1, 1]
    rot, shear = u() * math.radians(8), u() * 0.15
    sx, sy, tx, ty = 1 + 0.12 * u(), 1 + 0.12 * u(), 0.08 * u(), 0.08 * u()
    theta = torch.stack([torch.stack([sx * rot.cos(), -sx * rot.sin() + shear, tx], 1),
                         torch.stack([sy * rot.sin(), sy * rot.cos(), ty], 1)], 1)  # (B, 2, 3): output -> input
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # stroke weight along x, then along y: w in [-1, 1] moves each pixel towards its 3-px max (w > 0,
    # thicker) or min (w < 0, thinner); different wx, wy give thin horizontals and thick verticals
    for w, k, p in ((u(), (1, 3), (0, 1)), (u(), (3, 1), (1, 0))):
        w = w.view(-1, 1, 1, 1)
        thick, thin = F.max_pool2d(x, k, 1, p), -F.max_pool2d(-x, k, 1, p)
        x = x + w.clamp_min(0) * (thick - x) + (-w).clamp_min(0) * (thin - x)
    # blur: sigma uniform in [0, 1.5] px for half of the images, none for the others
    sigma = torch.rand(B, generator=g) * 1.5 * (torch.rand(B, generator=g) < 0.5)
    x = blur(x, sigma.to(dev))
    return x / x.amax((1, 2, 3), keepdim=True).clamp_min(0.1)  # eroded-then-blurred strokes back to full ink


@torch.no_grad()
def topk_accuracy(net, head, images, labels, ks=(1, 5)):
    """Share of glyphs whose class is among the head's top k, for each k."""
    hits = torch.zeros(len(ks))
    for x, y in zip(images.split(500), labels.split(500)):
        top = head(features(net, x).to(head.weight.device)).topk(max(ks), 1).indices.cpu()
        hits += torch.tensor([(top[:, :k] == y[:, None]).any(1).sum().item() for k in ks], dtype=torch.float)
    return (hits / len(images)).tolist()


def train_features(args):
    """Train the trunk to name the kanji of Sans renders; report Sans and unseen-Serif accuracies; save."""
    import pylopdf_fonts_jp
    from tqdm import tqdm

    device = data.pick_device(args.device)
    torch.manual_seed(args.seed)
    sans = data.load_dataset("kanji", image_size=64, data_dir=args.data_dir, font=str(pylopdf_fonts_jp.sans_path()))
    serif = data.load_dataset("kanji", image_size=64, data_dir=args.data_dir, font=str(pylopdf_fonts_jp.serif_path()))
    cls = {c: i for i, c in enumerate(sans.labels.tolist())}  # code point -> class index
    y = torch.arange(len(sans.images))
    seen = torch.tensor([c in cls for c in serif.labels.tolist()])  # Serif glyphs whose kanji Sans has
    serif_x, serif_y = serif.images[seen], torch.tensor([cls[c] for c in serif.labels[seen].tolist()])
    if args.limit:  # a quick run on the first classes only (tests); accuracies then cover those classes
        y, keep = y[:args.limit], serif_y < args.limit
        serif_x, serif_y = serif_x[keep], serif_y[keep]
    n_cls = len(y)

    net = FeatureNet(args.feature_size, args.feature_width, args.feature_dim).to(device)
    x01 = sans.images[:n_cls].float() / 255
    pix = prepare(x01, args.feature_size)
    net.mean.fill_(pix.mean().item())
    net.std.fill_(pix.std().item())
    head = nn.Linear(args.feature_dim, n_cls).to(device)  # the classifier: trained here, not shipped
    params = list(net.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=5e-4)
    steps = args.epochs * math.ceil(n_cls / args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(args.seed)
    images = sans.images[:n_cls].to(device)
    print(f"feature net: {sum(p.numel() for p in net.parameters()) / 1e6:.2f} M parameters (+ head "
          f"{sum(p.numel() for p in head.parameters()) / 1e6:.2f} M), {n_cls} Sans kanji, {device}, {args.precision}")
    t0 = time.time()
    for epoch in range(args.epochs):
        net.train()
        perm = torch.randperm(n_cls, generator=g)
        bar = tqdm(perm.split(args.batch_size), desc=f"epoch {epoch + 1}/{args.epochs}", leave=False)
        for idx in bar:
            x = augment(images[idx.to(device)].float() / 255, g)
            with data.autocast(device, args.precision):
                loss = F.cross_entropy(head(net(x)).float(), y[idx].to(device), label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if (epoch + 1) % args.test_every == 0 or epoch + 1 == args.epochs:
            net.eval()
            top1, top5 = topk_accuracy(net, head, serif_x, serif_y)
            print(f"epoch {epoch + 1}: loss {loss.item():.3f}, Serif top-1 {top1:.3f} top-5 {top5:.3f}, "
                  f"{(time.time() - t0) / 60:.1f} min")
    seconds = time.time() - t0
    net.eval()
    sans_top1, sans_top5 = topk_accuracy(net, head, sans.images[:n_cls], y)
    top1, top5 = topk_accuracy(net, head, serif_x, serif_y)
    print(f"accuracy: Noto Sans JP (trained on, no augmentation) top-1 {sans_top1:.4f} top-5 {sans_top5:.4f}; "
          f"Noto Serif JP (never seen) top-1 {top1:.4f} top-5 {top5:.4f} over {len(serif_y)} kanji")
    out = {"version": FEATURES_VERSION, "input_size": args.feature_size, "width": args.feature_width,
           "dim": args.feature_dim, "state_dict": {k: v.cpu() for k, v in net.state_dict().items()},
           "trained_on": f"Noto Sans JP, {n_cls} kanji at 64 px, {args.epochs} epochs, seed {args.seed}",
           "minutes": round(seconds / 60, 1),
           "accuracy": {"sans_top1": sans_top1, "sans_top5": sans_top5, "serif_top1": top1, "serif_top5": top5,
                        "serif_n": len(serif_y)}}
    data.atomic_save(out, args.features)
    print(f"wrote {args.features} ({os.path.getsize(args.features) / 1e6:.1f} MB) after {seconds / 60:.1f} min")


# ----------------------------------------------------------------------------------------------------
# The reference set, computed once: embeddings and their moments, binarized glyphs

@dataclass
class Reference:
    name: str
    net: FeatureNet
    feats: torch.Tensor   # (M, D) float32 embeddings
    mu: torch.Tensor      # (D,) float64 mean of feats
    sigma: torch.Tensor   # (D, D) float64 covariance of feats
    bits: torch.Tensor    # (M, S*S) bool: glyphs binarized at half ink, at the reference size S
    soft: torch.Tensor    # (M, 1024) float32 unit vectors of blurred 32x32 glyphs, to pick IoU candidates
    size: int
    gray: float           # gray_share of the reference glyphs themselves

    def __len__(self):
        return len(self.feats)


def soft_glyphs(x01):
    """(N, 1, S, S) -> (N, 1024): blurred 32x32 glyphs of unit norm; their cosine tolerates small shifts."""
    return F.normalize(blur(prepare(x01, 32), 1.5).flatten(1), dim=1)


def reference(images, name="training set", net=None, device="cpu"):
    """Reference statistics of (M, 1, S, S) uint8 or [0, 1] images, ink bright; keep it and reuse it.

    A training script evaluating every few epochs builds this once from its dataset:
        ref = evaluate.reference(ds.images, "kanji", device=device); evaluate.fid_kid(samples01, ref)
    """
    if net is None:
        net, _ = load_features(device=device)
    x01 = prepare(images, images.shape[-1])
    feats = features(net, x01)
    mu, sigma = moments(feats)
    return Reference(name, net, feats, mu, sigma, (x01 > 0.5).flatten(1), soft_glyphs(x01), x01.shape[-1],
                     gray_share(x01))


def kanji_reference(font=None, image_size=64, data_dir="data", net=None, device="cpu", limit=None):
    """The kanji training set (Noto Serif JP, 64 px by default) as a Reference, and its Dataset."""
    ds = data.load_dataset("kanji", image_size=image_size, data_dir=data_dir, font=font, limit=limit)
    font_name = os.path.basename(font or data.default_font())
    ref = reference(ds.images, f"kanji {font_name} {image_size}px" + (f" first {limit}" if limit else ""), net, device)
    return ref, ds


# ----------------------------------------------------------------------------------------------------
# The metrics

def gray_share(x01):
    """Ink crispness: the share of pixels that are neither paper nor ink (0.1 < v < 0.9) in [0, 1] images.

    Blur is what a kanji-identity feature space sees least; anti-aliased real glyphs have a few percent of such
    edge pixels, a blurry model many more."""
    x = x01.float()
    return ((x > 0.1) & (x < 0.9)).float().mean().item()


def moments(feats):
    """(N, D) -> mean (D,) and unbiased covariance (D, D), in float64."""
    f = feats.double()
    mu = f.mean(0)
    d = f - mu
    return mu, d.T @ d / (len(f) - 1)


def sqrtm_trace(a, b):
    """tr((a b)^1/2) for symmetric positive semi-definite a, b, without scipy.

    (a b)^1/2 has the eigenvalues of the symmetric PSD matrix a^1/2 b a^1/2, so the trace is the sum of
    the square roots of that matrix's eigenvalues; eigh in float64, tiny negative round-off clamped to 0.
    """
    w, v = torch.linalg.eigh(a)
    ra = (v * w.clamp_min(0).sqrt()) @ v.T  # a^1/2
    m = ra @ b @ ra
    return torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum().item()


def fid(mu1, s1, mu2, s2):
    """Frechet distance of two Gaussians: |mu1 - mu2|^2 + tr(s1 + s2 - 2 (s1 s2)^1/2)."""
    return max(0.0, ((mu1 - mu2) ** 2).sum().item() + (s1.trace() + s2.trace()).item() - 2 * sqrtm_trace(s1, s2))


def kid(fx, fy, subsets=KID_SUBSETS, subset_size=KID_SUBSET_SIZE, seed=0):
    """Kernel inception distance: unbiased MMD^2 with the kernel (x.y / D + 1)^3, mean and std over
    random subsets (the same for every call with the same seed and sizes).

    Pairs of identical points are left out of the cross term as the diagonal is left out of the
    within-set terms: a sample that IS a reference point (a copy, or a set scored against itself)
    would otherwise add k(x, x) to the cross term and push KID below zero.
    """
    g = torch.Generator().manual_seed(1_000_003 * seed + 1)  # salted: differs from the caller's draws with this seed
    m = min(subset_size, len(fx), len(fy))
    d = fx.shape[1]
    vals = []
    for _ in range(subsets):
        x = fx[torch.randperm(len(fx), generator=g)[:m]]
        y = fy[torch.randperm(len(fy), generator=g)[:m]]
        xx, yy, xy = (x @ x.T).double(), (y @ y.T).double(), (x @ y.T).double()  # (m, m) dot products
        k = lambda dot: (dot / d + 1) ** 3
        off = lambda dot: (k(dot).sum() - k(dot.diagonal()).sum()) / (m * (m - 1))  # mean without the diagonal
        nx, ny = xx.diagonal()[:, None], yy.diagonal()[None]  # squared norms
        distinct = nx + ny - 2 * xy > 1e-5 * (nx + ny)  # squared distance not ~0 (fp32 dot products)
        vals.append((off(xx) + off(yy) - 2 * (k(xy) * distinct).sum() / distinct.sum()).item())
    vals = torch.tensor(vals, dtype=torch.double)
    return vals.mean().item(), vals.std().item() if subsets > 1 else 0.0


def knn_radii(f, k):
    """Distance of every row of f (N, D) to its k-th nearest other row (N,)."""
    return torch.cat([torch.cdist(c, f).kthvalue(k + 1, 1).values for c in f.split(1024)])  # +1: itself at 0


def covered(q, f, radii):
    """(Nq,) bool: q lies inside at least one ball (f_j, radii_j)."""
    return torch.cat([(torch.cdist(c, f) <= radii[None]).any(1) for c in q.split(1024)])


def precision_recall(real, fake, k=PR_K, seed=0):
    """Improved precision (share of fakes inside the real k-NN manifold) and recall (share of reals
    inside the fake one). The larger set is subsampled to the smaller's size (seeded): the k-NN radii
    shrink as a set grows, so only equal sizes give a fair, symmetric pair of numbers."""
    g = torch.Generator().manual_seed(1_000_003 * seed + 2)  # salted: differs from the caller's draws with this seed
    n = min(len(real), len(fake))
    real = real[torch.randperm(len(real), generator=g)[:n]].double()
    fake = fake[torch.randperm(len(fake), generator=g)[:n]].double()
    p = covered(fake, real, knn_radii(real, k)).double().mean().item()
    r = covered(real, fake, knn_radii(fake, k)).double().mean().item()
    return p, r


def closest_iou(x01, ref, shift=COPY_SHIFT, candidates=CANDIDATES, chunk=128):
    """Closest training glyph of every sample by binarized IoU, best over shifts of up to `shift` px.

    Exhaustive exact IoU against every glyph at every shift costs ~(2*shift+1)^2 x 100 GFLOP for 2000 x
    12,700 glyphs; instead the `candidates` glyphs with the highest cosine of blurred 32x32 images (one
    1024-d matmul) get the exact IoU. Measured on 300 held-out kanji: 92% get the exact best, the others
    lose 0.002 on average (at most 0.11) and all of those have a best IoU below 0.7; near copies are found.
    Returns iou (N,) float and index (N,) into the reference.
    """
    x01 = prepare(x01, ref.size)
    cand = (soft_glyphs(x01) @ ref.soft.T).topk(min(candidates, len(ref)), 1).indices  # (N, K)
    S, P = ref.size, shift
    best_iou, best_idx = [], []
    for xs, cs in zip(x01.split(chunk), cand.split(chunk)):
        q = F.pad((xs > 0.5).float(), (P, P, P, P))              # (n, 1, S+2P, S+2P)
        q = F.unfold(q, S)                                        # (n, S*S, (2P+1)^2): every shifted window
        c = ref.bits[cs].float()                                  # (n, K, S*S)
        inter = torch.bmm(c, q)                                   # (n, K, shifts)
        union = c.sum(2, keepdim=True) + q.sum(1, keepdim=True) - inter
        iou = (inter / union.clamp_min(1)).amax(2)                # (n, K): best shift per candidate
        v, j = iou.max(1)
        best_iou.append(v)
        best_idx.append(cs.gather(1, j[:, None])[:, 0])
    return torch.cat(best_iou), torch.cat(best_idx)


def fid_kid(x01, ref, seed=0):
    """FID and KID of (N, C, H, W) [0, 1] images (ink bright) against a Reference: the cheap part of
    `measure`, for training scripts logging every few epochs (~3 s for 1,000 samples on a 2-core CPU, most
    of it the 100 KID subsets)."""
    f = features(ref.net, x01)
    mu, sigma = moments(f)
    k, k_std = kid(f, ref.feats, seed=seed)
    return {"fid": fid(mu, sigma, ref.mu, ref.sigma), "kid": k, "kid_std": k_std}


def measure(x01, ref, seed=0, pairs=None):
    """Every number of the report for (N, C, H, W) [0, 1] images, ink bright, against a Reference.

    pairs: a PNG path to draw the 32 samples with the highest closest IoU, each followed by its closest
    training glyph (binarized), to see what the near-copy rate counts.
    """
    if len(x01) < 2:
        raise data.GanjiError(f"need at least 2 images to measure, got {len(x01)}")
    t0 = time.time()
    f = features(ref.net, x01)
    mu, sigma = moments(f)
    k, k_std = kid(f, ref.feats, seed=seed)
    p, r = precision_recall(ref.feats, f, seed=seed)
    iou, idx = closest_iou(x01, ref)
    if pairs:
        top = iou.argsort(descending=True)[:32]
        glyph = ref.bits[idx[top]].float().view(-1, 1, ref.size, ref.size)
        both = torch.stack([prepare(x01[top], ref.size), glyph], 1).flatten(0, 1)  # sample, glyph, sample, ...
        data.save_grid(both, pairs, display_invert=True, nrow=16)
    q = torch.quantile(iou.double(), torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.double)).tolist()
    return {"n": len(x01), "reference": ref.name, "reference_n": len(ref),
            "fid": fid(mu, sigma, ref.mu, ref.sigma), "kid": k, "kid_std": k_std,
            "kid_subsets": KID_SUBSETS, "kid_subset_size": min(KID_SUBSET_SIZE, len(f), len(ref)),
            "precision": p, "recall": r, "pr_k": PR_K,
            "near_copy_rate": (iou > COPY_IOU).double().mean().item(), "copy_iou": COPY_IOU, "copy_shift": COPY_SHIFT,
            "gray_share": gray_share(x01), "reference_gray_share": ref.gray,
            "closest_iou": dict(zip(("q10", "q25", "median", "q75", "q90"), q), mean=iou.mean().item(),
                                min=iou.min().item(), max=iou.max().item()),
            "seed": seed, "seconds": round(time.time() - t0, 2)}


# ----------------------------------------------------------------------------------------------------
# Inputs: a checkpoint's samples, a folder of images or one grid PNG

def load_images(path, size):
    """A folder of glyph images (recursively) or one grid PNG as sample.py writes it (cells of `size`
    px, 2 px padding) -> (N, 1, size, size) uint8, ink bright. Either polarity: a set that is mostly
    bright (black ink on white paper, as sample.py saves) is inverted. Empty grid cells are dropped."""
    from PIL import Image

    if os.path.isdir(path):
        x = data.load_folder(path, size, 1)
    elif os.path.isfile(path):
        try:
            with Image.open(path) as im:
                g = torch.frombuffer(bytearray(im.convert("L").tobytes()), dtype=torch.uint8).view(im.height, im.width)
        except Exception:
            raise data.GanjiError(f"{path} is not a readable image")
        c = size + 2
        if (g.shape[0] - 2) % c or (g.shape[1] - 2) % c:
            raise data.GanjiError(f"{path} ({g.shape[1]}x{g.shape[0]}) is not a grid of {size} px cells with 2 px "
                                  f"padding; pass a folder of images, or the cell size with --image-size")
        cells = g[2:, 2:].unfold(0, c, c).unfold(1, c, c)[..., :size, :size]  # (rows, cols, size, size)
        x = cells.reshape(-1, 1, size, size)
        x = x[x.flatten(1).float().std(1) > 0]  # an empty cell is one flat colour
        if not len(x):
            raise data.GanjiError(f"{path}: every grid cell is empty")
    else:
        raise data.GanjiError(f"no such file or folder: {path}")
    return 255 - x if x.float().mean() > 127.5 else x


def sample_checkpoint(args, device):
    """args.n samples of args.ckpt in batches of args.batch_size -> (n, C, S, S) [0, 1], config, kind, the sampling
    options (sample.sampling: flags given win, the rest is what the file's record recommends), a few words on
    them and the guide's path. The same n and seed give the same samples."""
    from tqdm import tqdm

    mod, net, cfg = sample.load_any(args.kind, args.ckpt, device)
    if cfg.get("dataset", "kanji") != "kanji":
        raise data.GanjiError(f"{args.ckpt} was trained on {cfg.get('dataset')}; the feature network knows only kanji")
    opts, how, guide = sample.sampling(args, mod, cfg, device)
    out = []
    for b, i in enumerate(tqdm(range(0, args.n, args.batch_size), desc=f"sampling {mod.KIND}", leave=False)):
        # one seed per batch, derived from --seed
        out.append(sample.generate(mod, net, cfg, min(args.batch_size, args.n - i), seed=args.seed * 1_000_003 + b,
                                   device=device, **opts))
    return torch.cat(out).float().cpu(), cfg, mod.KIND, opts, how, guide


# ----------------------------------------------------------------------------------------------------
# Calibration: rows any model can be placed between

def chimeras(x, g):
    """Left half of one glyph glued to the right half of another (a shuffled partner)."""
    other = x[torch.randperm(len(x), generator=g)]
    half = x.shape[-1] // 2
    return torch.cat([x[..., :half], other[..., half:]], -1)


def calibrate(args, ref, ds, net):
    """The calibration rows: n images of each kind measured like a model's samples (seeded draws)."""
    import pylopdf_fonts_jp

    g = torch.Generator().manual_seed(args.seed)
    x = ds.images.float() / 255
    perm = torch.randperm(len(x), generator=g)
    half_a, half_b = perm[:len(x) // 2], perm[len(x) // 2:]
    n = min(args.n, len(half_b))
    pick = perm[:n]  # n training glyphs
    sans = data.load_dataset("kanji", image_size=ref.size, data_dir=args.data_dir,
                             font=str(pylopdf_fonts_jp.sans_path()))
    sans_pick = torch.randperm(len(sans.images), generator=g)[:n]
    ref_a = reference(x[half_a], f"{ref.name}, random half ({len(half_a)})", net)
    rows = [
        ("real vs real: held-out half vs the other half", x[half_b[:n]], ref_a),
        ("training glyphs themselves (a perfect memorizer)", x[pick], ref),
        ("Noto Sans JP renders (another font)", sans.images[sans_pick].float() / 255, ref),
        ("training glyphs blurred, sigma 1 px", blur(x[pick], 1.0), ref),
        ("training glyphs blurred, sigma 2 px", blur(x[pick], 2.0), ref),
        ("chimeras: left half + right half of two glyphs", chimeras(x[pick], g), ref),
        ("uniform noise", torch.rand(n, 1, ref.size, ref.size, generator=g), ref),
    ]
    results = []
    for name, imgs, r in rows:
        m = measure(imgs.clamp(0, 1), r, seed=args.seed)
        m["row"] = name
        results.append(m)
        print(table_row(m), flush=True)
    return results


# ----------------------------------------------------------------------------------------------------
# Steering: variations and completions of a seeded set of real kanji, measured against the whole font

def pair_iou(a01, b01, keep=None, shift=COPY_SHIFT):
    """IoU of the binarized glyphs a and b (N, 1, S, S) pair by pair (N,): best over shifts of up to `shift` px, or,
    with a keep mask (1, 1, S, S), over the kept pixels only and unshifted (does a completion keep its source?)."""
    a, b = a01.float() > 0.5, b01.float() > 0.5
    if keep is not None:
        m = keep.bool()
        return ((a & b & m).flatten(1).sum(1) / ((a | b) & m).flatten(1).sum(1).clamp(min=1)).float()
    S, P = a.shape[-1], shift
    windows = F.unfold(F.pad(b.float(), (P, P, P, P)), S)        # (N, S*S, shifts)
    inter = (a.float().flatten(1)[:, :, None] * windows).sum(1)    # (N, shifts)
    union = a.float().flatten(1).sum(1)[:, None] + windows.sum(1) - inter
    return (inter / union.clamp(min=1)).amax(1)


def steering(args, ref, ds, device):
    """The steering table: free samples, variations at each of --strengths and completions around each of --masks,
    of --sources kanji drawn from the font with --seed, --per samples each, measured like any samples against the
    whole font, plus how close each stays to its own source (pair_iou) and, for completions, the kept pixels'
    agreement with it."""
    mod, net, cfg = sample.load_any(args.kind, args.ckpt, device)
    if mod.KIND == "gan":
        raise data.GanjiError("--steering measures a DDPM or a VAE: the GAN cannot start from a given glyph")
    opts, how, _ = sample.sampling(args, mod, cfg, device)
    g = torch.Generator().manual_seed(args.seed)
    pick = torch.randperm(len(ds.images), generator=g)[:args.sources]
    x0 = (ds.images[pick].float() / 255).repeat_interleave(args.per, 0)  # (sources * per, 1, S, S)
    n = len(x0)
    kw = dict(batch_size=args.batch_size, **sample.pick(mod, opts, ("sampler", "steps", "eta", "guide", "guidance",
                                                                 "guide_min_t"))) if mod.KIND == "ddpm" else {}
    vary = mod.edit if mod.KIND == "ddpm" else lambda net, cfg, x0, s, *a: mod.variations(net, cfg, x0, n, s, *a[1:])
    rows = [("free samples", None, lambda: mod.sample(net, cfg, n, args.seed, device, **kw))]
    for s in (float(v) for v in args.strengths.split(",")):
        rows.append((f"variations, strength {s:g}", None,
                     lambda s=s: vary(net, cfg, x0, s, n, args.seed, device, **kw)))
    for name in args.masks.split(",") if mod.KIND == "ddpm" and args.masks else []:
        keep = sample.keep_mask(name, cfg["image_size"])
        rows.append((f"completions, keep {name}", keep, lambda keep=keep: mod.inpaint(
            net, cfg, x0, keep, n, args.seed, device, resample=args.resample or ddpm.RESAMPLE,
            jump=args.jump or ddpm.JUMP, **kw)))
    print(f"{mod.KIND} {args.ckpt}, {how or 'its sampler'}; {args.sources} kanji x {args.per} samples, "
          f"seed {args.seed}")
    head, rule = TABLE_HEAD.replace("| images |", "| steering |").split("\n")
    print(f"{head} IoU to source, median | source copies | kept IoU, median | seconds |\n{rule}{' --- |' * 4}")
    results = []
    for name, keep, draw in rows:
        t0 = time.time()
        x = draw()
        seconds = time.time() - t0
        m = measure(x, ref, seed=args.seed)
        near = pair_iou(x, x0)
        m.update(row=name, seconds=round(seconds, 1), source_iou_median=near.median().item(),
                 source_copy_rate=(near > COPY_IOU).double().mean().item(),
                 kept_iou_median=pair_iou(x, x0, keep).median().item() if keep is not None else None)
        kept = f"{m['kept_iou_median']:.3f}" if keep is not None else "-"
        print(f"{table_row(m)} {m['source_iou_median']:.3f} | {m['source_copy_rate']:.3f} | {kept} | {seconds:.0f} |",
              flush=True)
        results.append(m)
    return results


def write_record(path, m, how, opts, guide=None):
    """Put the figures into a slim file's record, so that `sample.py info` and the window show them. A DDPM's
    record also keeps the sampling they were measured with, which sample.py, the window and evaluate.py then use
    by default: sampler, steps, and the guide (its path relative to the file's folder), weight and least guided t."""
    ckpt = data.load_checkpoint(path)
    if not ckpt.get("slim"):
        raise data.GanjiError(f"--record writes into slim files only; make one with: "
                              f"python sample.py export {path} OUT")
    keys = ("n", "fid", "kid", "precision", "recall", "near_copy_rate", "gray_share", "reference_gray_share")
    ckpt["record"]["evaluate"] = {**{k: m[k] for k in keys}, "sampler": how or None, "date": time.strftime("%Y-%m-%d")}
    if ckpt["kind"] == "ddpm":
        ckpt["record"]["sampling"] = {"sampler": opts["sampler"], "steps": opts["steps"]}
        ckpt["record"]["guide"] = None if "guide" not in opts else \
            {"file": os.path.relpath(guide, os.path.dirname(os.path.abspath(path))), "guidance": opts["guidance"],
             "min_t": opts["guide_min_t"]}
    data.atomic_save(ckpt, path)
    print(f"wrote the figures into {path}'s record")


def table_row(m):
    c = m["closest_iou"]
    return (f"| {m.get('row', m.get('source', ''))} | {m['n']} vs {m['reference_n']} | {m['fid']:.2f} | "
            f"{1000 * m['kid']:.2f} ± {1000 * m['kid_std']:.2f} | {m['precision']:.3f} | {m['recall']:.3f} | "
            f"{m['near_copy_rate']:.3f} | {c['median']:.2f} ({c['q10']:.2f}-{c['q90']:.2f}) | "
            f"{m['gray_share']:.3f} ({m['reference_gray_share']:.3f}) |")


TABLE_HEAD = ("| images | n vs reference | FID | KID x 1000 (± std) | precision | recall | near-copy rate | "
              "closest IoU median (q10-q90) | gray share (reals') |\n"
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |")


# ----------------------------------------------------------------------------------------------------

def get_parser():
    p = argparse.ArgumentParser(description="Measure realism (FID, KID, precision/recall) and novelty "
                                            "(near-copy rate) of fake kanji against the kanji training set.")
    p.add_argument("kind", nargs="?", choices=("vae", "gan", "ddpm", "auto"), help="model kind of CKPT")
    p.add_argument("ckpt", nargs="?", help="checkpoint to sample from (full or slim)")
    p.add_argument("--sampler", default=None, choices=ddpm.SAMPLERS,
                   help=f"DDPM sampler (default: the file's record, else {ddpm.SAMPLER})")
    p.add_argument("--steps", type=int, default=None,
                   help=f"DDPM sampler steps (default: the record's, else {ddpm.STEPS})")
    p.add_argument("--prior", default=None, choices=("normal", "gmm"),
                   help="VAE latents: N(0, I) or its fitted mixture (default: the run's --prior)")
    sample.add_guide_args(p)
    p.add_argument("--record", action="store_true",
                   help="also write the figures into the slim file's record (pretrained/*.pt)")
    p.add_argument("--images", default=None, metavar="DIR_OR_FILE",
                   help="measure these instead: a folder of glyph images (recursively) or one grid PNG as "
                        "sample.py writes it; black-on-white or white-on-black")
    p.add_argument("--calibrate", action="store_true", help="print the calibration table rows")
    p.add_argument("--steering", action="store_true",
                   help="with KIND CKPT: the steering table (variations and completions, docs/steering.md)")
    p.add_argument("--train-features", action="store_true", help="train the feature network and write --features")
    p.add_argument("--n", type=int, default=2000,
                   help="samples to draw, or rows per calibration set (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="sampling noise, metric subsets, calibration sets, feature training (default: %(default)s)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"), help="(default: %(default)s)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the results as JSON")
    p.add_argument("--pairs", default=None, metavar="PNG",
                   help="also draw the 32 samples closest to a training glyph, each beside that glyph")
    p.add_argument("--batch-size", type=int, default=250,
                   help="sampling batch (default: %(default)s); 256 when training features")
    g = p.add_argument_group("--steering")
    g.add_argument("--sources", type=int, default=200, help="kanji to steer from, drawn with --seed (default: 200)")
    g.add_argument("--per", type=int, default=10, help="samples per source kanji (default: %(default)s)")
    g.add_argument("--strengths", default="0.2,0.35,0.5,0.65,0.8",
                   help="variations' strengths, comma-separated (default: %(default)s)")
    g.add_argument("--masks", default="left,top,outside",
                   help="completions' masks, comma-separated; empty for none (default: %(default)s)")
    g.add_argument("--resample", type=int, default=None, help=f"completions' resamplings (default: {ddpm.RESAMPLE})")
    g.add_argument("--jump", type=int, default=None, help=f"completions' jump length (default: {ddpm.JUMP})")
    g = p.add_argument_group("reference set")
    g.add_argument("--font", default=None,
                   help="font of the reference kanji (default: the checkpoint's, else Noto Serif JP)")
    g.add_argument("--image-size", type=int, default=None,
                   help="reference glyph size (default: the checkpoint's, else 64)")
    g.add_argument("--data-dir", default="data", help="kanji render cache (default: %(default)s)")
    g.add_argument("--limit", type=int, default=None,
                   help="only the first N kanji as reference (or as classes of --train-features), for quick checks "
                        "(default: all)")
    g.add_argument("--features", default=WEIGHTS, help="feature network weights (default: kanji_features.pt here)")
    g = p.add_argument_group("--train-features")
    g.add_argument("--epochs", type=int, default=30, help="(default: %(default)s)")
    g.add_argument("--lr", type=float, default=3e-3, help="peak of the one-cycle schedule (default: %(default)s)")
    g.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                   help="auto = bf16 on a CUDA GPU that has it, else fp32 (default: %(default)s)")
    g.add_argument("--test-every", type=int, default=5,
                   help="print the Serif accuracy every N epochs (default: %(default)s)")
    g.add_argument("--feature-size", type=int, default=32, help="input side of the network (default: %(default)s)")
    g.add_argument("--feature-width", type=int, default=32, help="channels of the first stage (default: %(default)s)")
    g.add_argument("--feature-dim", type=int, default=256, help="embedding size (default: %(default)s)")
    return p


def main(argv=None):
    p = get_parser()
    args = p.parse_args(argv)
    modes = sum([args.ckpt is not None, args.images is not None, args.calibrate, args.train_features])
    if modes != 1 or (args.kind is None) != (args.ckpt is None):
        raise data.GanjiError("give exactly one of: KIND CKPT, --images PATH, --calibrate, --train-features")
    if args.record and (not args.ckpt or args.steering):
        raise data.GanjiError("--record needs KIND CKPT (and no --steering): it writes the figures into that slim file")
    if args.steering and not args.ckpt:
        raise data.GanjiError("--steering needs KIND CKPT: the model whose variations and completions it measures")
    if args.n < 2 or args.batch_size < 1:
        raise data.GanjiError("--n must be at least 2 and --batch-size at least 1")
    if args.train_features:
        if args.batch_size == p.get_default("batch_size"):
            args.batch_size = 256
        return train_features(args)
    if args.images and not os.path.exists(args.images):
        raise data.GanjiError(f"no such file or folder: {args.images}")
    device = data.pick_device(args.device)
    net, info = load_features(args.features, device)

    t0 = time.time()
    images, cfg, source = None, {}, None
    if args.ckpt and not args.steering:
        images, cfg, kind, opts, how, guide = sample_checkpoint(args, device)
        source = f"{kind} {args.ckpt} ({how + ', ' if how else ''}seed {args.seed})"
    elif args.steering:
        cfg = data.load_checkpoint(args.ckpt, args.kind, mmap=True)["config"]
    size = args.image_size or cfg.get("image_size") or 64
    font = args.font or cfg.get("font")
    ref, ds = kanji_reference(font, size, args.data_dir, net, device, args.limit)
    if args.images:
        images = load_images(args.images, size)
        source = args.images
    feature_note = f"kanji_features v{info['version']} (Serif top-1 {info['accuracy']['serif_top1']:.3f})"
    print(f"reference: {ref.name}, {len(ref)} glyphs; features: {feature_note}")
    print(TABLE_HEAD)
    if args.calibrate:
        results = calibrate(args, ref, ds, net)
    elif args.steering:
        results = steering(args, ref, ds, device)
    else:
        m = measure(images, ref, seed=args.seed, pairs=args.pairs)
        m["source"] = source
        m["seconds_total"] = round(time.time() - t0, 1)
        print(table_row(m))
        print(f"FID {m['fid']:.2f}, KID {m['kid']:.5f} ± {m['kid_std']:.5f}, precision {m['precision']:.3f}, "
              f"recall {m['recall']:.3f}, near copies {m['near_copy_rate']:.1%} (closest IoU > {COPY_IOU}), "
              f"gray share {m['gray_share']:.3f} (reals {m['reference_gray_share']:.3f}), "
              f"{m['n']} images vs {m['reference_n']} references, {m['seconds_total']:.0f} s")
        results = m
        if args.record:
            write_record(args.ckpt, m, how, opts, guide)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"features": feature_note, "results": results}, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    data.cli(main)
