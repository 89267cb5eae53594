"""The configuration schema: every key a config may set, with its default, and start-up validation.

Config files in configs/ start from `default_config()`, which is *locked*: assigning a key that is not
defined here (a typo such as `config.model.nff`) raises at once, and so does a value of the wrong type.
Section and key names follow score_sde_pytorch wherever the concept is the same.
"""
from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder


def default_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    config.training = training = ml_collections.ConfigDict()
    training.sde = "vpsde"  # vpsde | subvpsde | vesde | edm (Karras et al.: σ(t) = t on [sigma_min, sigma_max])
    training.continuous = True  # False: DDPM (VP) / SMLD (VE) discrete-time loss and network labels
    training.reduce_mean = False  # mean (True) or sum (False) of the per-example loss over dimensions
    training.likelihood_weighting = False
    training.importance_sampling = False  # with likelihood_weighting: t ~ g²/σ² instead of uniform (lower variance)
    training.loss = "dsm"  # dsm (denoising score matching) | edm (EDM's λ(σ) weighting, log-normal σ; see losses.py)
    training.eps = 1e-5  # smallest t of the continuous loss
    training.batch_size = 128  # per process: the global batch is batch_size × the number of torchrun processes
    training.n_iters = 1300001
    training.log_freq = 50
    training.eval_freq = 100  # held-out loss on one test batch
    training.snapshot_freq = 50000  # numbered checkpoints workdir/checkpoints/checkpoint_<step // freq>.pth
    training.snapshot_freq_for_preemption = 10000  # workdir/checkpoints-meta/checkpoint_<step>.pth, resumed from
    training.keep_meta_checkpoints = 2  # newest preemption checkpoints kept (a corrupt newest falls back to older)
    training.snapshot_sampling = True  # sample grid with EMA weights at every numbered checkpoint
    training.precision = "fp32"  # fp32 | bf16 (autocast) | fp16 (autocast + dynamic loss scaling)
    training.compile = False  # torch.compile the network for training
    training.compile_backend = "inductor"  # torch.compile backend (inductor; aot_eager / eager to debug)
    training.channels_last = False  # NHWC memory format for image networks (faster convolutions with cuDNN/oneDNN)
    training.on_nonfinite = "stop"  # NaN/inf loss or gradient: stop (diagnostics saved) | skip (step skipped, counted)
    # class-conditional models (model.num_classes > 0): probability that a training label is replaced by the null
    # label, so that the network also learns the unconditional score (classifier-free guidance needs > 0, e.g. 0.1)
    training.label_dropout = 0.0

    config.sampling = sampling = ml_collections.ConfigDict()
    sampling.method = "pc"
    sampling.predictor = "euler_maruyama"
    sampling.corrector = "none"
    sampling.n_steps_each = 1  # corrector steps per noise level
    sampling.snr = 0.16
    sampling.noise_removal = True  # final Tweedie denoising step
    sampling.probability_flow = False
    sampling.steps = placeholder(int)  # sampler steps; None → model.num_scales
    sampling.eps = placeholder(float)  # last time; None → the SDE's default
    sampling.num_grid_samples = 64  # images in snapshot and eval sample grids
    # options of particular methods (see sde_diffusion/sampling.py); the others ignore them
    sampling.rtol = 1e-5  # ode: relative tolerance of the adaptive RK45
    sampling.atol = 1e-5  # ode: absolute tolerance
    sampling.ode_backend = "torch"  # ode: torch (dopri5, state stays on the device) | scipy (solve_ivp on the host)
    sampling.sde_method = "euler"  # sde: torchsde's euler | milstein | srk
    sampling.eta = 0.0  # ddim: 0 deterministic, > 0 stochastic (1: ancestral with the posterior variance)
    sampling.order = 3  # dpm_solver: DPM-Solver++ order 1, 2 or 3
    sampling.rho = 7.0  # heun, and grid="edm": EDM's ρ of the σ/α grid
    sampling.grid = placeholder(str)  # ddim, dpm_solver, heun: time | logsnr | edm; None → the sampler's default
    # --mode sample, conditional (sde_diffusion/controllable.py): inpaint or colourize test images (or one image)
    sampling.inpaint_mask = placeholder(str)  # .png (white = known) or .npy (1 = known) mask, (H, W) or (C, H, W)
    sampling.inpaint_image = placeholder(str)  # .png/.npy image whose pixels are kept; None → the test images
    sampling.colorize = False  # colourize the grey (channel-mean) versions of the test images (3-channel data)
    sampling.conditioning_method = "replacement"  # replacement (score_sde) | repaint (+ resampling rounds)
    sampling.resample = 5  # repaint: RePaint resampling rounds per sampler update (each one more score call)
    # class-conditional sampling (sde_diffusion/guidance.py). class_labels: the classes --mode sample draws, e.g.
    # (3,) or (0, 5, 7), one grid row each; ("per_class",) (--config.sampling.class_labels=per_class): one row per
    # class; () → the labels of the test split, in order (also what eval and training snapshots use)
    sampling.class_labels = ()
    sampling.guidance_scale = 0.0  # w of classifier-free guidance: (1 + w)·s(x,t,y) − w·s(x,t); 0 = conditional
    sampling.classifier_scale = 0.0  # > 0: + scale·∇log p_t(y|x) of the classifier in workdir/classifier/

    config.eval = evaluate = ml_collections.ConfigDict()
    evaluate.begin_ckpt = 1
    evaluate.end_ckpt = 1
    evaluate.batch_size = 512
    evaluate.enable_loss = True
    evaluate.enable_sampling = True
    evaluate.num_samples = 64  # generated in rounds of eval.batch_size, each saved so eval resumes after a kill
    # sample quality (image data): FID / KID against reference statistics, IS when the weights have logits
    evaluate.enable_fid = True
    evaluate.fid_split = "train"  # reference images: train (as published FIDs) | test
    evaluate.fid_num_reference = placeholder(int)  # None → every image of the split; set only for quick checks
    evaluate.inception_path = placeholder(str)  # explicit Inception weights (see evaluation/inception.py)
    evaluate.inception_download = False  # allow clean-fid to download the Inception weights
    evaluate.inception_batch_size = 50
    evaluate.stats_dir = placeholder(str)  # reference-statistics cache; None → <data.root>/fid_stats

    # bits/dim by the probability-flow ODE (sde_diffusion.likelihood.evaluate_bpd), on eval.batch_size batches
    evaluate.enable_bpd = False
    evaluate.bpd_dataset = "test"  # test | train
    evaluate.bpd_repeats = 1  # passes over the split, each with fresh dequantization noise and probes
    evaluate.bpd_num_batches = placeholder(int)  # batches per pass; None → the whole split
    evaluate.bpd_divergence = "rademacher"  # exact (small dimensions only) | rademacher | gaussian
    evaluate.bpd_rtol = 1e-5
    evaluate.bpd_atol = 1e-5
    evaluate.bpd_eps = 1e-5  # the time the data live at

    # --mode compare: one table row per sampler entry "method[:option=value,...]@steps", e.g. "dpm_solver:order=2@20"
    config.compare = compare = ml_collections.ConfigDict()
    compare.samplers = ("pc@100", "ddim@20", "dpm_solver@10", "heun@10")
    compare.num_samples = placeholder(int)  # None → eval.num_samples
    compare.checkpoint = placeholder(int)  # None → the newest numbered checkpoint

    config.data = data = ml_collections.ConfigDict()
    data.dataset = "digits"  # digits | cifar10 | folder (your own images) | gmm | moons | swiss_roll
    data.root = "data"  # where dataset files live (CIFAR-10: the archive or its extracted folder; folder: see below)
    data.download = False  # fetch missing public datasets (checksummed); off by default
    data.image_size = 8
    data.num_channels = 1
    data.dim = 2  # dimension of toy (vector) data
    data.centered = True  # images in [−1, 1] (True) or [0, 1] (False)
    data.random_flip = False
    data.uniform_dequantization = False
    # training batches: built in the main process (0) or by DataLoader workers, bit-identical either way
    data.num_workers = 0
    data.pin_memory = False  # page-locked batches for faster copies to a CUDA device (ignored without CUDA)
    # data.dataset='folder' (sde_diffusion/image_folder.py): data.root is a folder tree of .png/.jpg/.jpeg/.webp
    # images (any depth), a .zip of them, or a uint8 array (N, H, W, C) in a .npy / single-array .npz; each image
    # is center-cropped to a square and resized to data.image_size once, then cached as a uint8 array
    data.resize_filter = "lanczos"  # Pillow filter of the one resize: box | bilinear | bicubic | lanczos
    data.allow_upsample = False  # images smaller than data.image_size are an error unless True
    data.convert_channels = False  # True: convert every image to data.num_channels (RGB ↔ grey); False: must match
    data.labels = "none"  # none | folders (first sub-folder name, sorted) | path to a labels file (.csv/.txt/.npy)
    data.test_fraction = 0.1  # held out by data.split_seed when the source has no train/ and test/ folders
    data.split_seed = 0
    data.skip_corrupt = False  # True: skip unreadable images (counted and reported) instead of failing
    data.cache_dir = placeholder(str)  # preprocessed-array cache; None → <parent of data.root>/sde_diffusion_cache

    config.model = model = ml_collections.ConfigDict()
    model.name = "ddpm"
    model.nf = 128
    model.ch_mult = (1, 2, 2, 2)
    model.num_res_blocks = 2
    model.attn_resolutions = (16,)
    model.dropout = 0.1
    model.resamp_with_conv = True
    model.conditional = True
    model.nonlinearity = "swish"
    model.scale_by_sigma = False
    model.embedding_type = "positional"  # positional | fourier (of log σ)
    model.fourier_scale = 16.0
    model.ema_rate = 0.9999
    model.num_classes = 0  # > 0: class-conditional, a label embedding (+ a null label) added to the noise embedding
    # what the network predicts (sde_diffusion/parameterization.py): auto (score_sde's: eps for VP/sub-VP, score for
    # VE, edm for EDM) | eps | score (σ·score) | x0 | edm (EDM's preconditioned denoiser, any SDE)
    model.parameterization = "auto"
    # the network's noise input: auto (the parameterization's; discrete step labels with training.continuous=False)
    # | time (999·t/T) | step | sigma (σ(t)) | log_sigma (¼·ln(σ/α), EDM's c_noise)
    model.noise_conditioning = "auto"
    model.sigma_data = 0.5  # EDM's σ_data, of the edm parameterization and training.loss='edm'
    # SDE parameters (in `model` as in score_sde)
    model.beta_min = 0.1
    model.beta_max = 20.0
    model.beta_schedule = "linear"  # linear | cosine | quadratic (VP, sub-VP)
    model.num_scales = 1000
    model.sigma_min = 0.01
    model.sigma_max = 50.0
    # NCSN++ / DDPM++ (model.name='ncsnpp'), with score_sde's names and meanings
    model.resblock_type = "biggan"  # biggan (resampling inside residual blocks) | ddpm
    model.fir = False  # FIR-filtered up/downsampling (StyleGAN2) instead of nearest / average pooling
    model.fir_kernel = (1, 3, 3, 1)
    model.skip_rescale = True  # residual sums divided by √2
    model.init_scale = 0.0  # init scale of the last conv of every residual branch (0 → near zero)
    model.progressive = "none"  # output pyramid: none | output_skip | residual
    model.progressive_input = "none"  # input pyramid: none | input_skip | residual
    model.progressive_combine = "sum"  # how input_skip joins the features: sum | cat
    model.attention_type = "ddpm"  # the only kind (accepted for score_sde config compatibility)
    model.normalization = "GroupNorm"  # the only kind (idem)
    model.conv_size = 3  # the only size (idem)
    # DiT (model.name='dit'): width model.nf, `depth` transformer blocks of `num_heads` heads
    model.patch_size = 2
    model.depth = 6
    model.num_heads = 4
    model.mlp_ratio = 4.0

    # noise-conditional classifier p_t(y | x_t) for classifier guidance (sde_diffusion/classifier.py), trained by
    # --mode train_classifier on batches of training.batch_size at t ~ U(training.eps, T); it shares the noise
    # embedding options of config.model (embedding_type, fourier_scale, nonlinearity)
    config.classifier = classifier = ml_collections.ConfigDict()
    classifier.nf = 32  # base width: of the U-Net encoder (images) or the residual MLP (vectors)
    classifier.ch_mult = (1, 2, 2)  # encoder levels (images)
    classifier.num_res_blocks = 1  # residual blocks per encoder level, or MLP blocks
    classifier.attn_resolutions = ()  # encoder resolutions with self-attention (images)
    classifier.dropout = 0.0
    classifier.n_iters = 2000
    classifier.lr = 1e-3  # Adam, constant
    classifier.log_freq = 100

    config.optim = optim = ml_collections.ConfigDict()
    optim.optimizer = "Adam"
    optim.lr = 2e-4
    optim.beta1 = 0.9
    optim.eps = 1e-8
    optim.weight_decay = 0.0
    optim.warmup = 5000
    optim.grad_clip = 1.0  # max gradient norm; negative disables clipping

    config.seed = 42
    config.device = "auto"  # auto (cuda if available) | cpu | cuda | cuda:N
    config.lock()
    return config


def load_config_file(path) -> ml_collections.ConfigDict:
    """get_config() of a config file such as configs/vp_cifar.py (as main.py's --config loads it)."""
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


class ConfigError(ValueError):
    """A config value or combination that cannot work; the message names the key and the fix."""


def _choice(key: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not one of {sorted(allowed)}")


def _positive(key: str, value) -> None:
    if not value > 0:
        raise ConfigError(f"{key} must be > 0, got {value}")


def _check_bpd(e) -> None:
    """The eval.bpd_* keys (sde_diffusion.likelihood.evaluate_bpd)."""
    from .likelihood import DIVERGENCES
    _choice("eval.bpd_dataset", e.bpd_dataset, ("test", "train"))
    _choice("eval.bpd_divergence", e.bpd_divergence, DIVERGENCES)
    for key in ("bpd_repeats", "bpd_rtol", "bpd_atol"):
        _positive(f"eval.{key}", e[key])
    if e.bpd_num_batches is not None:
        _positive("eval.bpd_num_batches", e.bpd_num_batches)
    if not 0.0 < e.bpd_eps < 1.0:
        raise ConfigError(f"eval.bpd_eps must lie in (0, 1), got {e.bpd_eps}")


def _check_training_engine(config) -> None:
    """Precision, compilation, memory format, non-finite policy and checkpoint retention."""
    from . import train_step
    t = config.training
    _choice("training.precision", t.precision, train_step.PRECISIONS)
    _choice("training.on_nonfinite", t.on_nonfinite, train_step.NONFINITE_POLICIES)
    _positive("training.keep_meta_checkpoints", t.keep_meta_checkpoints)
    if t.channels_last and config.model.name in ("mlp", "dit"):
        raise ConfigError(f"training.channels_last=True applies to convolutional networks; model.name="
                          f"{config.model.name!r} has none: set training.channels_last=False")
    if t.compile:
        import torch._dynamo
        backends = torch._dynamo.list_backends(exclude_tags=())
        _choice("training.compile_backend", t.compile_backend, backends)


def _check_data(d) -> None:
    """The data loader keys and the data.dataset='folder' keys (sde_diffusion/image_folder.py)."""
    from . import datasets
    if d.num_workers < 0:
        raise ConfigError(f"data.num_workers must be ≥ 0 (0: batches built in the main process), got {d.num_workers}")
    if d.dataset.lower() != datasets.FOLDER:
        return
    from . import image_folder  # Pillow, only for your own images
    _choice("data.resize_filter", d.resize_filter, image_folder.RESIZE_FILTERS)
    _choice("data.num_channels", d.num_channels, (1, 3))
    _positive("data.image_size", d.image_size)
    if not 0.0 <= d.test_fraction < 1.0:
        raise ConfigError(f"data.test_fraction must lie in [0, 1) (0: the test split is the training set), "
                          f"got {d.test_fraction}")
    if not d.labels.strip():
        raise ConfigError("data.labels is empty: use 'none', 'folders' or the path of a labels file")


def _check_conditional_sampling(config) -> None:
    """The sampling.* keys of conditional sampling (inpainting, colorization) in --mode sample."""
    from . import controllable, datasets
    s, d = config.sampling, config.data
    _choice("sampling.conditioning_method", s.conditioning_method, controllable.METHODS)
    _positive("sampling.resample", s.resample)
    if s.inpaint_mask is None and not s.colorize:
        if s.inpaint_image is not None:
            raise ConfigError("sampling.inpaint_image is set but there is nothing to condition on: set "
                              "sampling.inpaint_mask (inpainting) or sampling.colorize=True")
        return
    if s.inpaint_mask is not None and s.colorize:
        raise ConfigError("sampling.inpaint_mask and sampling.colorize=True are two different tasks: set one")
    if d.dataset.lower() not in datasets.IMAGE_DATASETS:
        raise ConfigError(f"inpainting and colorization need image data, not data.dataset={d.dataset!r}")
    if s.colorize and d.num_channels != 3:
        raise ConfigError(f"sampling.colorize=True needs 3-channel (RGB) data, but data.num_channels="
                          f"{d.num_channels}")
    shape = (d.num_channels, d.image_size, d.image_size)
    for key, load in (("inpaint_mask", controllable.load_mask), ("inpaint_image", controllable.load_image)):
        if s[key] is not None:
            try:
                load(s[key], shape)
            except (ValueError, OSError) as err:
                raise ConfigError(f"sampling.{key}: {err}") from err


PER_CLASS = "per_class"  # sampling.class_labels=per_class: one grid row per class


def sample_label_rows(config, num_classes: int):
    """The class labels sampling.class_labels asks for, one grid row each: a tuple of ints, () for none;
    'per_class' means 0..num_classes−1 (the dataset's classes)."""
    labels = tuple(config.sampling.class_labels)
    return tuple(range(num_classes)) if labels == (PER_CLASS,) else labels


def _check_classes(config) -> None:
    """Class-conditional models, label dropout, guidance and the classifier (guidance.py, classifier.py)."""
    from . import datasets
    t, s, m, c, d = config.training, config.sampling, config.model, config.classifier, config.data
    if d.dataset.lower() == datasets.FOLDER and d.labels != "none":
        classes = m.num_classes or None  # counted when the images are loaded (datasets.check_classes)
        has_labels = f"has labels (data.labels={d.labels!r})"
    else:
        classes = datasets.NUM_CLASSES.get(d.dataset.lower(), 0)
        has_labels = f"has {classes} classes" if classes else "has no class labels"
    if m.num_classes < 0 or (m.num_classes and classes is not None and m.num_classes != classes):
        raise ConfigError(f"model.num_classes={m.num_classes}, but data.dataset={d.dataset!r} {has_labels}: set "
                          f"model.num_classes={classes or 0} (or 0 for an unconditional model)")
    if m.num_classes and not m.conditional:
        raise ConfigError("model.num_classes > 0 adds the label embedding to the noise embedding: set "
                          "model.conditional=True")
    if not 0.0 <= t.label_dropout < 1.0:
        raise ConfigError(f"training.label_dropout must lie in [0, 1), got {t.label_dropout}")
    if t.label_dropout and not m.num_classes:
        raise ConfigError("training.label_dropout > 0 drops class labels, but the model is unconditional: set "
                          f"model.num_classes={classes or 'N (the number of classes)'} or training.label_dropout=0")
    if s.guidance_scale < 0:
        raise ConfigError(f"sampling.guidance_scale must be ≥ 0, got {s.guidance_scale}")
    if s.guidance_scale and not m.num_classes:
        raise ConfigError("sampling.guidance_scale ≠ 0 (classifier-free guidance) needs a class-conditional model: "
                          "set model.num_classes and train with training.label_dropout > 0")
    if s.guidance_scale and not t.label_dropout:
        raise ConfigError("sampling.guidance_scale ≠ 0 needs the unconditional score, which the null label only "
                          "learns with training.label_dropout > 0 (e.g. 0.1): retrain with it, or set "
                          "sampling.guidance_scale=0")
    if s.classifier_scale < 0:
        raise ConfigError(f"sampling.classifier_scale must be ≥ 0, got {s.classifier_scale}")
    if s.classifier_scale and classes == 0:
        raise ConfigError(f"sampling.classifier_scale > 0 needs a classifier, but data.dataset={d.dataset!r} "
                          f"{has_labels} to train one on")
    labels = tuple(s.class_labels)
    if labels and labels != (PER_CLASS,):
        if not all(isinstance(y, int) and not isinstance(y, bool) for y in labels):
            raise ConfigError(f"sampling.class_labels={labels!r} must be class indices such as (3,) or (0, 5), or "
                              f"{PER_CLASS!r}")
        if classes is not None and not all(0 <= y < classes for y in labels):
            raise ConfigError(f"sampling.class_labels={labels!r}: data.dataset={d.dataset!r} {has_labels}, so "
                              f"labels must lie in 0..{classes - 1}")
    if labels and not (m.num_classes or s.classifier_scale):
        raise ConfigError("sampling.class_labels needs a class-conditional model (model.num_classes > 0) or "
                          "classifier guidance (sampling.classifier_scale > 0)")
    for key in ("nf", "num_res_blocks", "n_iters", "lr", "log_freq"):
        _positive(f"classifier.{key}", c[key])
    if not 0.0 <= c.dropout < 1.0:
        raise ConfigError(f"classifier.dropout must lie in [0, 1), got {c.dropout}")
    if classes != 0 and d.dataset.lower() in datasets.IMAGE_DATASETS:
        from .classifier import check_encoder
        try:
            check_encoder(config)
        except ValueError as err:
            raise ConfigError(f"config.classifier cannot be built: {err}") from err


def validate_config(config) -> None:
    """Check values and combinations before any compute is spent; raises ConfigError naming the key."""
    from . import datasets, models, sampling, sdes  # late imports: the schema itself needs only ml_collections

    t, s, m, d, e = config.training, config.sampling, config.model, config.data, config.eval
    _choice("training.sde", t.sde.lower(), sdes.SDES)
    _choice("model.name", m.name, models.MODELS)
    _choice("data.dataset", d.dataset.lower(), datasets.DATASETS)
    _choice("model.beta_schedule", m.beta_schedule, sdes.BETA_SCHEDULES)
    _choice("sampling.method", s.method, sampling.SAMPLERS)
    _choice("sampling.predictor", s.predictor, sampling.PREDICTORS)
    _choice("sampling.corrector", s.corrector, sampling.CORRECTORS)
    _choice("sampling.sde_method", s.sde_method, sampling.SDE_METHODS)
    _choice("sampling.ode_backend", s.ode_backend, sampling.ODE_BACKENDS)
    _choice("sampling.order", s.order, (1, 2, 3))
    if s.grid is not None:
        _choice("sampling.grid", s.grid, sampling.GRIDS)
    for key in ("rtol", "atol", "rho"):
        _positive(f"sampling.{key}", s[key])
    if s.eta < 0:
        raise ConfigError(f"sampling.eta must be ≥ 0, got {s.eta}")
    if s.method == "pc" and s.predictor == "ancestral_sampling" and s.probability_flow:
        raise ConfigError("sampling.predictor='ancestral_sampling' is stochastic: with sampling.probability_flow=True "
                          "use euler_maruyama or reverse_diffusion")
    for key in ("training.batch_size", "training.n_iters", "training.log_freq", "training.eval_freq",
                "training.snapshot_freq", "training.snapshot_freq_for_preemption", "eval.batch_size",
                "eval.num_samples", "sampling.num_grid_samples", "model.num_scales", "optim.lr"):
        section, name = key.split(".")
        _positive(key, config[section][name])
    if not 0.0 < t.eps < 1.0:
        raise ConfigError(f"training.eps must lie in (0, 1), got {t.eps}")
    from . import losses, parameterization
    for check_component in (sdes.check_config, parameterization.check_config, losses.check_config):
        check_component(config)
    if not t.continuous and t.likelihood_weighting:
        raise ConfigError("training.likelihood_weighting=True needs training.continuous=True")
    if t.importance_sampling and not t.likelihood_weighting:
        raise ConfigError("training.importance_sampling=True samples t for the likelihood-weighted loss: set "
                          "training.likelihood_weighting=True")
    _check_bpd(e)
    _check_training_engine(config)
    if e.enable_bpd and d.dataset.lower() not in datasets.IMAGE_DATASETS:
        raise ConfigError(f"eval.enable_bpd=True measures bits/dim of K-level discrete images, but data.dataset="
                          f"{d.dataset!r} is continuous vector data: set eval.enable_bpd=False (eval reports its "
                          "exact NLL where the data has a density)")
    _check_conditional_sampling(config)
    _check_classes(config)
    if s.steps is not None and s.steps < 1:
        raise ConfigError(f"sampling.steps must be ≥ 1 (or None for model.num_scales), got {s.steps}")
    if e.begin_ckpt > e.end_ckpt:
        raise ConfigError(f"eval.begin_ckpt={e.begin_ckpt} is after eval.end_ckpt={e.end_ckpt}")
    if m.name != "mlp" and d.dataset.lower() in datasets.TOY_SAMPLERS:
        raise ConfigError(f"data.dataset={d.dataset!r} is vector data: use model.name='mlp'")
    if m.name == "mlp" and d.dataset.lower() in datasets.IMAGE_DATASETS:
        raise ConfigError(f"model.name='mlp' is for vector data, not the image dataset {d.dataset!r}")
    check_model = getattr(models.MODELS[m.name], "check_config", None)  # the network's own option rules
    if check_model is not None:
        try:
            check_model(config)
        except ValueError as err:
            raise ConfigError(str(err)) from err
    _check_data(d)
    if d.dataset.lower() in datasets.IMAGE_DATASETS and m.name in ("ddpm", "ncsnpp"):
        size, levels = d.image_size, len(m.ch_mult) - 1
        if size % 2**levels:
            raise ConfigError(f"data.image_size={size} cannot be halved {levels} times for model.ch_mult={m.ch_mult}")
        reached = {size // 2**i for i in range(levels + 1)}
        unreachable = [r for r in m.attn_resolutions if r not in reached]
        if unreachable:
            raise ConfigError(f"model.attn_resolutions has {unreachable}, which the network never reaches "
                              f"(its resolutions are {sorted(reached, reverse=True)})")
