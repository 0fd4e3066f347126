"""The one set of defaults every recipe in configs/ starts from (the official ymls' values).

`recipe(dataset, backbone)` returns a full ConfigDict; a recipe file overrides what its yml changes.
Unknown keys are rejected: by ml_collections when overridden from the command line, by `check_keys` (the CLI calls
it) when a config file adds them.
"""
from __future__ import annotations

import difflib

import ml_collections

VIT, RN50 = "ViT-B-16", "RN50"


def recipe(dataset: str, backbone: str = VIT, *, root: str = "data/", vehicle: bool = False) -> ml_collections.ConfigDict:
  vit = backbone.startswith("ViT")
  c = ml_collections.ConfigDict()
  c.mode = "train"  # train | eval | extract
  c.seed = 1234  # the official SOLVER.SEED
  c.workdir = f"workdirs/{dataset}_{'vit' if vit else 'cnn'}"
  c.log_every_steps = 50
  c.checkpoint_every_epochs = 1  # stage 2 (and the last epoch of each stage, and on SIGTERM)
  c.data_workers = 0  # grain worker processes (0: threads in the main process)
  c.prefetch_batches = 2  # stage-2 batches sent to the devices ahead of their step (overlaps the copy)
  c.visualize = True  # after training: rank lists, t-SNE and curves in WORKDIR/visualizations/
  # JAX's persistent compilation cache: executables that took over a second to compile are kept in this folder and
  # reused by later runs of the same programs (a resumed run, an evaluation). auto: $XDG_CACHE_HOME/clipreid_jax/jax
  # (default ~/.cache/...); "": off. JAX_COMPILATION_CACHE_DIR, where set, wins.
  c.compilation_cache = "auto"

  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = dataset
  c.dataset.root = root
  c.dataset.check_counts = True  # warn when split counts differ from the published ones
  c.dataset.test_size = 800  # VehicleID test list: 800, 1600 or 2400
  # VehicleID: seed of the loaded query/gallery split (the metrics average eval.trials draws seeded from `seed`)
  c.dataset.gallery_seed = 0
  c.dataset.keypoint_dir = ""  # VeRi: folder of keypoint_{train,test}.txt (default: the dataset root)
  # Read the dataset from its packed copy (python -m clipreid_jax.data.prepare ... --data_dir DIR) instead of root
  c.dataset.packed_dir = ""
  if dataset == "synthetic":  # drawn at dataset.root on first use (clipreid_jax.data.synthetic)
    c.dataset.num_train_ids = 32
    c.dataset.num_test_ids = 16
    c.dataset.imgs_per_id = 8
    c.dataset.num_cams = 4  # 2..6: Market-1501 names cameras c1..c6
    c.dataset.seed = 0

  c.model = ml_collections.ConfigDict()
  # ViT-* or RN*: the family's pixel normalisation (and ID-loss weight where loss.id_weight is None); the architecture
  # is init.clip's (a random CLIP takes its ViT patch from the name). The solver, epochs and loss weights are set by
  # the recipe for its backbone: for the other family use its recipe file (configs/*_cnn.py, *_vit.py), not this key.
  c.model.backbone = backbone
  c.model.input_size = (256, 256) if vehicle else (256, 128)
  c.model.stride = 16  # 12 = overlapping patches (OLP)
  c.model.sie_camera = False
  c.model.sie_view = False
  c.model.sie_coe = 1.0  # the official SIE+OLP recipe uses 1.0 (the code default is 3.0)
  c.model.baseline = False  # True: the paper's baseline (image encoder only, no text)
  c.model.prompt_tokens = 4  # learned tokens per identity: "A photo of a X X X X person." (official: 4)
  # The prompt's last word(s): auto = "vehicle" for VeRi-776 and VehicleID, "person" otherwise (the official choice);
  # or your data's, e.g. "vehicle" for a custom set of vehicles.
  c.model.prompt_noun = "auto"
  c.model.dtype = "auto"  # auto: bfloat16 compute on GPU/TPU, float32 on CPU; parameters are always float32
  c.model.attention = "auto"  # auto / cudnn: cuDNN flash attention on NVIDIA GPUs in bf16/fp16, XLA's elsewhere;
  # xla: XLA's everywhere (deterministic backward pass; docs/reliability.md)
  c.model.random_clip = ml_collections.ConfigDict()  # sizes of a random CLIP when init.clip is empty (tests)
  c.model.random_clip.embed_dim = 0
  c.model.random_clip.vision_layers = 0
  c.model.random_clip.vision_width = 0
  c.model.random_clip.text_width = 0
  c.model.random_clip.text_layers = 0

  c.init = ml_collections.ConfigDict()
  c.init.clip = ""  # a directory from `python -m clipreid_jax.convert clip`
  # Another run's WORKDIR/stage1 (same model and training set): its prompts are used and stage 1 is skipped, e.g. to
  # sweep stage-2 settings; copied into this run's stage1/.
  c.init.stage1 = ""
  c.checkpoint = ""  # for eval / extract: a model directory (trained or converted)

  c.stage1 = ml_collections.ConfigDict()
  c.stage1.batch_size = 256 if dataset == "vehicleid" else 64
  c.stage1.base_lr = 3.5e-4
  c.stage1.weight_decay = 1e-4
  c.stage1.max_epochs = 120 if (vit and not vehicle) else 60  # person/vit_clipreid.yml trains 120 epochs
  c.stage1.warmup_lr_init = 1e-5
  c.stage1.lr_min = 1e-6
  c.stage1.warmup_epochs = 5
  c.stage1.log_every_epochs = 10
  # Stage-1 epochs take seconds on an accelerator, a checkpoint of the whole state about as long; a restart
  # redoes at most this many epochs.
  c.stage1.checkpoint_every_epochs = 10

  c.stage2 = ml_collections.ConfigDict()
  c.stage2.num_ids = 16  # P
  c.stage2.num_instances = 4  # K; the global batch is P * K = 64
  c.stage2.base_lr = 5e-6 if vit else 3.5e-4
  c.stage2.weight_decay = 1e-4 if vit else 5e-4
  c.stage2.weight_decay_bias = 1e-4 if vit else 5e-4
  c.stage2.bias_lr_factor = 2.0
  c.stage2.max_epochs = 60 if vit else 120
  c.stage2.steps = (30, 50) if vit else (40, 70)
  c.stage2.gamma = 0.1
  c.stage2.warmup_factor = 0.1 if vit else 0.01
  c.stage2.warmup_iters = 10
  c.stage2.warmup_method = "linear"

  c.loss = ml_collections.ConfigDict()
  c.loss.id_weight = 0.25 if vit else 1.0
  c.loss.triplet_weight = 1.0
  c.loss.i2t_weight = 1.0
  c.loss.label_smoothing = 0.1
  c.loss.margin = 0.3

  c.augment = ml_collections.ConfigDict()
  c.augment.flip_prob = 0.5
  c.augment.padding = 10
  c.augment.erase_prob = 0.5

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 64
  c.eval.period = 0  # evaluate every N stage-2 epochs (0: only at the end)
  c.eval.rerank = False
  c.eval.k1 = 50
  c.eval.k2 = 15
  c.eval.lambda_value = 0.3
  c.eval.flip = False  # test-time flip: mean of each image's and its mirror image's features (not official)
  c.eval.untrained = False  # also evaluate the model as built (before stage 1): metrics.json "untrained"
  c.eval.trials = 10  # VehicleID: random one-per-identity galleries averaged

  c.extract = ml_collections.ConfigDict()
  c.extract.input = ""  # a folder of images or a text file listing them
  c.extract.output = ""  # features.npy + features_index.txt are written here
  return c


def check_keys(config: ml_collections.ConfigDict) -> None:
  """ValueError naming a key that a config file added and no default has (a misspelt `c.stage2.base_lrr = 1e-3`
  trained with the default and was recorded in config.json as if used; ml_collections refuses it only as a
  command-line override), or a key it lacks (a traceback wherever the run first read it)."""
  flat = lambda c: {k for k, v in _flatten(c)}
  values = dict(_flatten(config))
  ours = set(values)
  name, backbone = config.get("dataset", {}).get("name", "synthetic"), config.get("model", {}).get("backbone", VIT)
  needed = flat(recipe(str(name), str(backbone)))
  # The synthetic data's sizes stay allowed: a config of synthetic data run on a real dataset (--config.dataset.name)
  known = needed | flat(recipe("synthetic", str(backbone)))
  # A section set to None (`c.model.random_clip = None` where init.clip is given) stands for its keys.
  dropped = {k for k in ours - known if values[k] is None and any(n.startswith(k + ".") for n in known)}
  unknown = sorted(ours - known - dropped)
  missing = sorted(k for k in needed - ours if not any(k.startswith(d + ".") for d in dropped))
  if unknown:
    close = difflib.get_close_matches(unknown[0], sorted(known), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise ValueError(f"unknown key {unknown[0]}{hint}{_more(unknown)}; expected the keys of "
                     "clipreid_jax/config_defaults.py recipe()")
  if missing:
    raise ValueError(f"missing key {missing[0]}{_more(missing)}; expected every key of "
                     "clipreid_jax/config_defaults.py recipe() (start from it and change what differs)")


def _flatten(c, prefix: str = ""):
  for k, v in c.items():
    if isinstance(v, (ml_collections.ConfigDict, dict)):
      yield from _flatten(v, f"{prefix}{k}.")
    else:
      yield f"{prefix}{k}", v


def _more(keys: list) -> str:
  return f" (and {', '.join(keys[1:4])}{', ...' if len(keys) > 4 else ''})" if len(keys) > 1 else ""


# (mAP, R1) of the paper's Tables 2-3 per (dataset, backbone, variant); VehicleID: (R1, R5) on the 800-ID test set.
PAPER = {
    ("msmt17", VIT, "clipreid"): (73.4, 88.7), ("msmt17", VIT, "sie_olp"): (75.8, 89.7),
    ("msmt17", VIT, "baseline"): (66.1, 84.4), ("msmt17", RN50, "clipreid"): (63.0, 84.4),
    ("msmt17", RN50, "baseline"): (60.7, 82.1),
    ("market1501", VIT, "clipreid"): (89.6, 95.5), ("market1501", VIT, "sie_olp"): (90.5, 95.4),
    ("market1501", VIT, "baseline"): (86.4, 93.3), ("market1501", RN50, "clipreid"): (89.8, 95.7),
    ("market1501", RN50, "baseline"): (88.1, 94.7),
    ("dukemtmc", VIT, "clipreid"): (82.5, 90.0), ("dukemtmc", VIT, "sie_olp"): (83.1, 90.8),
    ("dukemtmc", VIT, "baseline"): (80.0, 88.8), ("dukemtmc", RN50, "clipreid"): (80.7, 90.0),
    ("dukemtmc", RN50, "baseline"): (79.3, 88.6),
    ("occ_duke", VIT, "clipreid"): (59.5, 67.1), ("occ_duke", VIT, "sie_olp"): (60.3, 67.2),
    ("occ_duke", VIT, "baseline"): (53.5, 60.8), ("occ_duke", RN50, "clipreid"): (53.5, 61.0),
    ("occ_duke", RN50, "baseline"): (47.4, 54.2),
    ("veri", VIT, "clipreid"): (83.3, 97.4), ("veri", VIT, "sie_olp"): (84.5, 97.3),
    ("veri", VIT, "baseline"): (79.3, 95.7), ("veri", RN50, "clipreid"): (80.3, 96.8),
    ("veri", RN50, "baseline"): (79.3, 95.7),
    ("vehicleid", VIT, "clipreid"): (85.3, 97.6), ("vehicleid", VIT, "sie_olp"): (85.5, 97.2),
    ("vehicleid", VIT, "baseline"): (84.2, 96.6), ("vehicleid", RN50, "clipreid"): (85.2, 97.1),
    ("vehicleid", RN50, "baseline"): (84.4, None),  # R5 not reported
}

VARIANTS = ("clipreid", "sie_olp", "baseline")


def official(dataset: str, backbone: str, variant: str | None = None) -> ml_collections.ConfigDict:
  """The official yml for (dataset, backbone) with the README's variant applied.

  variant: 'clipreid' (default), 'sie_olp' (ViT: SIE on the camera, SIE_COE 1.0, patch stride 12; VeRi adds
  the view; VehicleID has OLP only) or 'baseline' (the image encoder alone, the *_base.yml solver).
  """
  variant = variant or "clipreid"
  if variant not in VARIANTS:
    raise ValueError(f"config argument: expected one of {VARIANTS}, got {variant!r}")
  vehicle = dataset in ("veri", "vehicleid")
  c = recipe(dataset, backbone, vehicle=vehicle)
  vit = backbone.startswith("ViT")
  if dataset == "vehicleid":
    if vit:
      c.stage2.base_lr = 5e-5
    else:
      c.loss.label_smoothing = 0.0
  if variant == "sie_olp":
    if not vit:
      raise ValueError("config argument: SIE and OLP are ViT-only")
    c.model.stride = 12
    c.model.sie_coe = 1.0
    c.model.sie_camera = dataset != "vehicleid"
    c.model.sie_view = dataset == "veri"
  elif variant == "baseline":
    c.model.baseline = True
    c.loss.id_weight = 1.0  # the official vit_base.yml files (every dataset); 0.25 is CLIP-ReID's ViT weight
    if dataset == "vehicleid":
      c.loss.label_smoothing = 0.0
  c.workdir = f"workdirs/{dataset}_{'vit' if vit else 'cnn'}_{variant}"
  return c
