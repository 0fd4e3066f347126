"""The PyTorch reference for the step benchmark: the official CLIP-ReID training steps, written here.

OpenAI's CLIP modules (openai-clip package) carry the towers; this file adds what the official
`make_model_clipreid.py`, `loss/*` and the processors add around them:

- stage 1: prompts "A photo of a X X X X person." with per-identity `cls_ctx`, the CLIP text transformer over all 77
  tokens (the official TextEncoder), SupCon i2t + t2i against a fixed feature bank, Adam on `cls_ctx` only. As in the
  official code, the text encoder's parameters keep requires_grad=True: their gradients are computed, never applied.
- stage 2: the image tower (ViT-B/16 with the resized positional table and the patch stride, or RN50 with last
  stride 1), BN necks without trainable bias, two bias-free classifiers, label-smoothed CE x2 (ID weight), batch-hard
  triplet on three features, label-smoothed i2t CE against fixed text features; Adam with coupled weight decay, bias
  lr x2.
- mixed precision as the official trains on GPU: autocast fp16 + GradScaler; float32 on the CPU.

Deliberate differences, all in the reference's favour (they remove host syncs or launches the official code has):
the label-smoothing one-hot is built on the device (the official builds it on the CPU and copies it over), triplet
mining uses masks (the official indexes with boolean masks, a device-to-host sync each), and stage 2's Adam has two
parameter groups (weights, biases) where the official has one group per tensor (`--torch_groups per_tensor`
measures that too).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# tokenize("A photo of a X X X X person."): SOT, a, photo, of, a, x x x x, person, ".", EOT (then zeros to 77).
TEMPLATE_TOKENS = [49406, 320, 1125, 539, 320, 343, 343, 343, 343, 2533, 269, 49407]
EOT_INDEX, CTX_START, N_CTX = 11, 5, 4


def resize_pos_embed(posemb: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
  """The official resize: keep row 0, bilinear (align_corners=False, no antialias) on the square grid."""
  first, rest = posemb[:1], posemb[1:]
  g = int(math.isqrt(rest.shape[0]))
  rest = rest.reshape(1, g, g, -1).permute(0, 3, 1, 2)
  rest = F.interpolate(rest, size=grid, mode="bilinear", align_corners=False)
  return torch.cat([first, rest.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)])


# --------------------------------------------------------------------------------------------------
# Stage 1.


class PromptText(nn.Module):
  """Official PromptLearner + TextEncoder over the full 77-token context."""

  def __init__(self, clip, num_classes: int, cls_ctx=None):
    super().__init__()
    width = clip.ln_final.weight.shape[0]
    tokens = torch.zeros(1, clip.context_length, dtype=torch.long)
    tokens[0, :len(TEMPLATE_TOKENS)] = torch.tensor(TEMPLATE_TOKENS)
    with torch.no_grad():
      emb = clip.token_embedding(tokens)
    self.register_buffer("token_prefix", emb[:, :CTX_START].clone())
    self.register_buffer("token_suffix", emb[:, CTX_START + N_CTX:].clone())
    self.cls_ctx = nn.Parameter(0.02 * torch.randn(num_classes, N_CTX, width) if cls_ctx is None else cls_ctx.clone())
    self.transformer = clip.transformer  # holds the causal mask
    self.positional_embedding = clip.positional_embedding
    self.ln_final = clip.ln_final
    self.text_projection = clip.text_projection

  def forward(self, labels):
    b = labels.shape[0]
    x = torch.cat([self.token_prefix.expand(b, -1, -1), self.cls_ctx[labels], self.token_suffix.expand(b, -1, -1)], 1)
    x = x + self.positional_embedding.type(x.dtype)
    x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
    x = self.ln_final(x)
    return x[:, EOT_INDEX] @ self.text_projection


def supcon(a, b, la, lb):
  """Official SupConLoss (temperature 1, raw dot products, detached row max)."""
  mask = (la[:, None] == lb[None, :]).float()
  logits = a @ b.T
  logits = logits - logits.max(1, keepdim=True)[0].detach()
  log_prob = logits - torch.log(torch.exp(logits).sum(1, keepdim=True))
  return -((mask * log_prob).sum(1) / mask.sum(1)).mean()


def stage1_step_fn(clip, num_classes: int, device, amp: bool, cls_ctx=None):
  model = PromptText(clip, num_classes, cls_ctx).to(device).train()
  opt = torch.optim.Adam([model.cls_ctx], lr=3.5e-4, weight_decay=1e-4)
  scaler = torch.amp.GradScaler("cuda", enabled=amp)

  def step(features, labels):
    opt.zero_grad()
    with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
      text = model(labels)
    loss = supcon(features, text, labels, labels) + supcon(text, features, labels, labels)  # outside autocast
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    return loss.detach()

  return step


# --------------------------------------------------------------------------------------------------
# Stage 2.


def vit_features(v, x):
  """Official modified VisionTransformer: (11th-block CLS, ln_post CLS, projected CLS)."""
  x = v.conv1(x)
  x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
  cls = v.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype, device=x.device)
  x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
  x = v.ln_pre(x).permute(1, 0, 2)
  blocks = v.transformer.resblocks
  for blk in blocks[:-1]:
    x = blk(x)
  x11 = x
  x12 = blocks[-1](x11)
  x11, x12 = x11.permute(1, 0, 2), x12.permute(1, 0, 2)
  x12 = v.ln_post(x12)  # the official applies ln_post and proj to every token
  xproj = x12 @ v.proj
  return x11[:, 0], x12[:, 0], xproj[:, 0]


def resnet_features(r, x):
  """Official ModifiedResNet (last stride 1): (GAP of layer3, GAP of layer4, attention pool)."""
  x = x.type(r.conv1.weight.dtype)
  x = r.relu1(r.bn1(r.conv1(x)))
  x = r.relu2(r.bn2(r.conv2(x)))
  x = r.relu3(r.bn3(r.conv3(x)))
  x = r.avgpool(x)
  x = r.layer2(r.layer1(x))
  x3 = r.layer3(x)
  x4 = r.layer4(x3)
  xproj = r.attnpool(x4)
  return x3.mean((2, 3)), x4.mean((2, 3)), xproj


def prepare_visual(clip, backbone: str, input_size, stride: int):
  """CLIP-ReID's changes to the tower: patch stride and positional table (ViT), last stride 1 (RN50)."""
  v = clip.visual
  h, w = input_size
  with torch.no_grad():
    if backbone == "vit":
      v.conv1.stride = (stride, stride)
      grid = ((h - 16) // stride + 1, (w - 16) // stride + 1)
      v.positional_embedding = nn.Parameter(resize_pos_embed(v.positional_embedding, grid))
    else:
      old = v.layer4.state_dict()
      v._inplanes = v.layer3[-1].conv3.weight.shape[0]  # pylint: disable=protected-access
      v.layer4 = v._make_layer(v.layer4[0].conv1.weight.shape[0], len(v.layer4), stride=1)  # pylint: disable=protected-access
      v.layer4.load_state_dict(old)
      pe = v.attnpool.positional_embedding
      v.attnpool.positional_embedding = nn.Parameter(resize_pos_embed(pe, (h // 16, w // 16)))
  return v


class ReIDHeads(nn.Module):
  def __init__(self, visual, backbone: str, num_classes: int):
    super().__init__()
    self.visual, self.backbone = visual, backbone
    width, proj = (768, 512) if backbone == "vit" else (2048, 1024)
    self.bottleneck, self.bottleneck_proj = nn.BatchNorm1d(width), nn.BatchNorm1d(proj)
    for bn in (self.bottleneck, self.bottleneck_proj):
      bn.bias.requires_grad_(False)
    self.classifier = nn.Linear(width, num_classes, bias=False)
    self.classifier_proj = nn.Linear(proj, num_classes, bias=False)
    for c in (self.classifier, self.classifier_proj):
      nn.init.normal_(c.weight, std=0.001)

  def forward(self, x):
    fn = vit_features if self.backbone == "vit" else resnet_features
    last, feat, proj = fn(self.visual, x)
    scores = (self.classifier(self.bottleneck(feat)), self.classifier_proj(self.bottleneck_proj(proj)))
    return scores, (last, feat, proj)


def ce_label_smooth(logits, targets, eps: float = 0.1):
  log_probs = F.log_softmax(logits, dim=1)
  onehot = torch.zeros_like(log_probs).scatter_(1, targets[:, None], 1)
  return (-((1 - eps) * onehot + eps / logits.shape[1]) * log_probs).mean(0).sum()


def triplet(feats, labels, margin: float = 0.3):
  """Official TripletLoss (unnormalised Euclidean, batch-hard), mined with masks."""
  # The official order of operations: under autocast the squared norms stay float32 and only the matmul is fp16,
  # so the 1e-12 clamp is representable (an fp16 addmm would flush it to 0 and make sqrt's gradient NaN).
  sq = feats.pow(2).sum(1, keepdim=True)
  dist = ((sq + sq.T) - 2 * torch.matmul(feats, feats.T)).clamp(min=1e-12).sqrt()
  same = labels[:, None] == labels[None, :]
  ap = dist.masked_fill(~same, float("-inf")).max(1)[0]
  an = dist.masked_fill(same, float("inf")).min(1)[0]
  return F.margin_ranking_loss(an, ap, torch.ones_like(an), margin=margin)


def stage2_step_fn(clip, backbone: str, num_classes: int, input_size, stride: int, text_features, device, amp: bool,
                   groups: str = "two"):
  visual = prepare_visual(clip, backbone, input_size, stride)
  model = ReIDHeads(visual, backbone, num_classes).to(device).train()
  vit = backbone == "vit"
  lr, wd, id_weight = (5e-6, 1e-4, 0.25) if vit else (3.5e-4, 5e-4, 1.0)
  named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
  if groups == "per_tensor":  # the official make_optimizer_2stage: one group per tensor
    param_groups = [{"params": [p], "lr": lr * (2 if "bias" in n else 1), "weight_decay": wd} for n, p in named]
  else:
    param_groups = [{"params": [p for n, p in named if "bias" not in n], "lr": lr, "weight_decay": wd},
                    {"params": [p for n, p in named if "bias" in n], "lr": 2 * lr, "weight_decay": wd}]
  opt = torch.optim.Adam(param_groups)
  scaler = torch.amp.GradScaler("cuda", enabled=amp)
  text = text_features.to(device)

  def step(images, labels):
    opt.zero_grad()
    with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
      (score, score_proj), (last, feat, proj) = model(images)
      i2t = proj @ text.T
      loss = (id_weight * (ce_label_smooth(score, labels) + ce_label_smooth(score_proj, labels))
              + triplet(last, labels) + triplet(feat, labels) + triplet(proj, labels)
              + ce_label_smooth(i2t, labels))
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    return loss.detach()

  return step
