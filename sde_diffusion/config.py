"""The configuration schema: every key a config may set, with its default.

Config files in configs/ start from `default_config()`, which is *locked*: assigning a key that is not
defined here (a typo such as `config.model.nff`) raises at once, and so does a value of the wrong type.
Section and key names follow score_sde_pytorch wherever the concept is the same. `validate_config` checks a
config by asking each section's owner (sde_diffusion/validation.py).
"""
from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder

from .errors import ConfigError  # noqa: F401  (importable from here too)


def default_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    config.training = training = ml_collections.ConfigDict()
    # vpsde | subvpsde | vesde | edm (Karras et al.: σ(t) = t on [sigma_min, sigma_max]) | rectified_flow (α = 1 − t,
    # σ = t) | an SDE of your own (@sdes.register_sde)
    training.sde = "vpsde"
    # options of an SDE of your own (@sdes.register_sde), 'k=v,...' (its __init__ keywords); the built-ins take model.*
    training.sde_options = ""
    training.continuous = True  # False: DDPM (VP) / SMLD (VE) discrete-time loss and network labels
    training.reduce_mean = False  # mean (True) or sum (False) of the per-example loss over dimensions
    training.likelihood_weighting = False
    training.importance_sampling = False  # with likelihood_weighting: t ~ g²/σ² instead of uniform (lower variance)
    training.loss = "dsm"  # dsm (denoising score matching) | edm (EDM's λ(σ) weighting, log-normal σ; see losses.py)
    # The objective's parts (sde_diffusion/losses.py), specs 'name[:option=value,...]'; None: what the keys above
    # mean (uniform / importance / discrete / log_normal, and eps / elbo / edm). Noise levels: uniform,
    # log_normal (p_mean, p_std), logit_normal (mean, std), uniform_log_snr, importance, discrete, or your own
    # (@losses.register_time_sampling). Weightings of the ε-error: eps, elbo, x0, v, velocity, edm (sigma_data),
    # min_snr (gamma), soft_min_snr (gamma), sigmoid (bias), or your own (@losses.register_weighting).
    training.time_sampling = placeholder(str)
    training.weighting = placeholder(str)
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
    training.compile = False  # torch.compile the training step (loss with the network, clipping, EMA)
    training.compile_backend = "inductor"  # torch.compile backend (inductor; aot_eager / eager to debug)
    training.tf32 = True  # on CUDA: TF32 matmuls and cuDNN convolutions (Ampere and later), cudnn.benchmark
    training.channels_last = False  # NHWC memory format for image networks (faster convolutions with cuDNN/oneDNN)
    training.on_nonfinite = "stop"  # NaN/inf loss or gradient: stop (diagnostics saved) | skip (step skipped, counted)
    # class-conditional models (model.num_classes > 0): probability that a training label is replaced by the null
    # label, so that the network also learns the unconditional score (classifier-free guidance needs > 0, e.g. 0.1)
    training.label_dropout = 0.0
    # text-conditioned models: probability that a training caption is replaced by the empty caption
    training.caption_dropout = 0.1
    # post-hoc EMA (EDM2, Karras et al. 2024; sde_diffusion/phema.py): the σ_rel of power-function EMA profiles tracked
    # every step, e.g. (0.05, 0.10); () → off. Each is snapshotted every post_hoc_ema_freq steps into
    # workdir/post_hoc_ema/, from which phema.reconstruct (eval.ema_sigma_rel) builds the EMA of any other σ_rel
    training.post_hoc_ema = ()
    training.post_hoc_ema_freq = 1000
    training.post_hoc_ema_precision = "fp32"  # dtype of the stored snapshots: fp32 | fp16 | bf16 (half the disk)

    config.sampling = sampling = ml_collections.ConfigDict()
    # a registered sampler (sde_diffusion/sampling) | auto: a distilled student's own (distill.method)
    sampling.method = "pc"
    sampling.predictor = "euler_maruyama"
    sampling.corrector = "none"
    sampling.n_steps_each = 1  # corrector steps per noise level
    sampling.snr = 0.16
    sampling.noise_removal = True  # final Tweedie denoising step
    sampling.probability_flow = False
    # sampler steps; None → the sampler's documented count (pc, ancestral, sde: model.num_scales)
    sampling.steps = placeholder(int)
    sampling.eps = placeholder(float)  # last time; None → the SDE's default
    sampling.num_grid_samples = 64  # images in snapshot and eval sample grids
    # options of particular methods, score_sde's names (sde_diffusion/sampling/settings.py maps them to the options
    # of the chosen method; the others ignore them)
    sampling.rtol = 1e-5  # ode: relative tolerance of the adaptive RK45
    sampling.atol = 1e-5  # ode: absolute tolerance
    sampling.ode_backend = "torch"  # ode: torch (dopri5 on the device) | torchdiffeq | scipy (RK45 on the host)
    sampling.sde_method = "euler"  # sde: torchsde's euler | milstein | srk
    sampling.eta = 0.0  # ddim: 0 deterministic, > 0 stochastic (1: ancestral with the posterior variance)
    sampling.order = 3  # dpm_solver: DPM-Solver++ order 1, 2 or 3
    sampling.rho = 7.0  # grid "edm" (heun's default): EDM's ρ of the σ/α grid
    # time | logsnr | edm | quadratic | sech | auto spacing of the time grid (auto: sech centred at the model's
    # data scale, measured on first use), or a grid file (.json, from --mode tune_grid); None → the sampler's default
    sampling.grid = placeholder(str)
    # grid "sech" or "auto": its widths in log-SNR, one number or (noisy side, clean side); None → the sampler's
    # default
    sampling.width = placeholder(object)
    sampling.options = ""  # "option=value,..." for the method's own options (e.g. a registered sampler's)
    # at every score evaluation of every sampler (sde_diffusion/sampling/controls.py): clip Tweedie's x̂₀ to [−c, c]
    # (1 for images in [−1, 1], data.centered); Imagen's dynamic thresholding at this percentile of |x̂₀|, as a
    # fraction (0.995) or in percent (99.5). None = off
    sampling.clip_x0 = placeholder(float)
    sampling.threshold = placeholder(float)
    # --mode sample, conditional (sde_diffusion/controllable.py): inpaint or colourize test images (or one image)
    sampling.inpaint_mask = placeholder(str)  # .png (white = known) or .npy (1 = known) mask, (H, W) or (C, H, W)
    sampling.inpaint_image = placeholder(str)  # .png/.npy image whose pixels are kept; None → the test images
    sampling.colorize = False  # colourize the grey (channel-mean) versions of the test images (3-channel data)
    sampling.conditioning_method = "replacement"  # replacement (score_sde) | repaint (+ resampling rounds)
    sampling.resample = 5  # repaint: RePaint resampling rounds per sampler update (each one more score call)
    # --mode sample, inverse problems (sde_diffusion/inverse): posterior samples given y = A·x + noise. inverse: the
    # operator A, "super_resolution:factor=2" | "inpaint:box=0.5" (or mask=FILE) | "blur:std=1.0" |
    # "matrix:file=A.npy" | a registered one; inverse_method: "mmps[:cg_steps=3]" | "pigdm" | "dps[:zeta=1.0]" | a
    # registered one; observation: the measured image (.png/.npy, [0, 1]: shaped like A's output, or like the data
    # and then measured) or .npz (`observation`, optional `ground_truth`); None → the test images, measured;
    # noise_std: σ_y in the network's data scale ([−1, 1] for centred images), added when an image is measured
    sampling.inverse = placeholder(str)
    sampling.inverse_method = "mmps"
    sampling.observation = placeholder(str)
    sampling.noise_std = 0.05
    # class-conditional sampling (sde_diffusion/guidance.py). class_labels: the classes --mode sample draws, e.g.
    # (3,) or (0, 5, 7), one grid row each; ("per_class",) (--config.sampling.class_labels=per_class): one row per
    # class; () → the labels of the test split, in order (also what eval and training snapshots use)
    sampling.class_labels = ()
    sampling.guidance_scale = 0.0  # w of classifier-free guidance: (1 + w)·s(x,t,y) − w·s(x,t); 0 = conditional
    # guidance only where the noise level σ(t)/α(t) (EDM's σ, the same for every SDE) lies in [σ_lo, σ_hi], e.g.
    # (0.3, 5.0) (Kynkäänniemi et al. 2024); the conditional score elsewhere. None: at every level
    sampling.guidance_interval = placeholder(tuple)
    # autoguidance (Karras et al. 2024): guidance_scale's w guides by a weaker model of the same task and
    # conditioning, (1 + w)·s_main − w·s_guide, instead of the unconditional score. guide_workdir: its run (same
    # data, SDE, classes and parameterization; its EMA weights); guide_checkpoint: its numbered checkpoint k
    # (None: the newest). guide_checkpoint alone: an earlier checkpoint of this same workdir
    sampling.guide_workdir = placeholder(str)
    sampling.guide_checkpoint = placeholder(int)
    # text-conditioned models: the caption every sample of --mode sample gets (None: eval's captions of the test
    # split's labels or captions); guidance_scale above is its classifier-free guidance weight
    sampling.prompt = placeholder(str)
    sampling.classifier_scale = 0.0  # > 0: + scale·∇log p_t(y|x) of the classifier in workdir/classifier/

    config.eval = evaluate = ml_collections.ConfigDict()
    # the numbered checkpoints begin..end (workdir/checkpoints/checkpoint_<k>.pth) are evaluated in order; the
    # missing ones are skipped (one log line names them), and only a range with none of them is an error
    evaluate.begin_ckpt = 1
    evaluate.end_ckpt = 1
    # True: wait for each missing checkpoint of the range (to follow a training run), looking every POLL_SECONDS
    # of jobs/evaluate.py (30 s); one is skipped once a later one exists; an error after wait_timeout without it
    evaluate.wait = False
    evaluate.wait_timeout = 3600.0  # seconds eval.wait waits for the next checkpoint to appear
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
    # latent models (model.latent): bits/dim is undefined (the decoder is no likelihood model); this reports the
    # probability-flow NLL of the encoded test latents instead, in nats and bits per latent dimension
    evaluate.enable_latent_nll = False
    # post-hoc EMA (training.post_hoc_ema): eval, sample and compare use the EMA of this σ_rel reconstructed from
    # workdir/post_hoc_ema/ at the evaluated checkpoint's step; 0 → the regular EMA (model.ema_rate)
    evaluate.ema_sigma_rel = 0.0
    # --mode ema_sweep: the σ_rel values evaluated (a table and a metric-versus-σ_rel plot in workdir/ema_sweep/)
    evaluate.ema_sweep = (0.025, 0.05, 0.075, 0.1, 0.15, 0.2)

    # --mode compare: one table row per sampler entry "method[:option=value,...]@steps", e.g. "dpm_solver:order=2@20",
    # or per step count of "method[:option=value,...]@steps,steps,...", e.g. "ddim@5,10,20" (a curve in the plot).
    # Every row runs on one time grid: the entry's grid= option, else sampling.grid, else
    # sampling.grids.default_spacing(steps) (FEW_STEP_GRID up to FEW_STEPS steps, DEFAULT_GRID above)
    config.compare = compare = ml_collections.ConfigDict()
    compare.samplers = ("pc@100", "ddim@20", "dpm_solver@10", "heun@10")
    # a distilled student's config: entries run on its teacher (distill.teacher_workdir), rows "teacher <sampler>" of
    # the same table, so that student and teacher are compared on equal terms
    compare.teacher_samplers = ()
    compare.num_samples = placeholder(int)  # None → eval.num_samples
    compare.checkpoint = placeholder(int)  # None → the newest numbered checkpoint
    # 95 % intervals of the metrics: jackknife groups for FID (each costs one eigendecomposition of size
    # min(num_samples, 2048)), bootstrap resamples for sliced W₂ (KID's and NLL's are closed-form); 0: no intervals
    compare.resamples = 20

    # --mode tune_grid: the time grid that brings one sampler closest to the probability-flow ODE's solution within
    # a budget of score calls (sampling.tune_grid), on the EMA weights; name the file it writes in sampling.grid or in
    # a compare entry (":grid=FILE.json")
    config.tune = tune = ml_collections.ConfigDict()
    tune.sampler = placeholder(str)  # "method[:option=value,...]"; None → sampling.method with its options
    tune.nfe = 10  # score calls, the final denoising call included when sampling.noise_removal
    tune.batch = 256  # prior draws the grid is fitted on
    tune.checkpoint = placeholder(int)  # None → the newest numbered checkpoint
    tune.out = placeholder(str)  # None → <workdir>/grids/<method>_nfe<nfe>.json

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
    # image training data held on the training device (batches, flips, dequantization built there, bit-identical to
    # the host's): "auto" (on CUDA when the uint8 set takes under DEVICE_DATA_FRACTION of free memory), True, False
    data.on_device = ml_collections.FieldReference("auto", field_type=object)
    # data.dataset='folder' (sde_diffusion/data/image_folder.py): data.root is a folder tree of .png/.jpg/.jpeg/.webp
    # images (any depth), a .zip of them, or a uint8 array (N, H, W, C) in a .npy / single-array .npz; each image
    # is center-cropped to a square and resized to data.image_size once, then cached as a uint8 array
    data.resize_filter = "lanczos"  # Pillow filter of the one resize: box | bilinear | bicubic | lanczos
    data.allow_upsample = False  # images smaller than data.image_size are an error unless True
    data.convert_channels = False  # True: convert every image to data.num_channels (RGB ↔ grey); False: must match
    data.labels = "none"  # none | folders (first sub-folder name, sorted) | path to a labels file (.csv/.txt/.npy)
    data.test_fraction = 0.1  # held out by data.split_seed when the source has no train/ and test/ folders
    data.split_seed = 0
    data.skip_corrupt = False  # True: skip unreadable images (counted and reported) instead of failing
    # captions of text-conditioned models: none | labels (made from class labels: digits, gmm) | a captions file
    # (CSV with columns name,caption, or JSON {name: caption}) naming the images of folder data
    data.captions = "none"
    data.cache_dir = placeholder(str)  # preprocessed-array cache; None → <parent of data.root>/sde_diffusion_cache

    config.model = model = ml_collections.ConfigDict()
    model.name = "ddpm"
    model.nf = 128
    model.ch_mult = (1, 2, 2, 2)
    model.num_res_blocks = 2
    model.attn_resolutions = (16,)
    model.up_attn_per_block = False  # attention after every up-path block (Ho et al., diffusers), not once per level
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
    # VE, edm for EDM) | eps | score (σ·score) | x0 | v (α·ε − σ·x0) | velocity (dx_t/dt) | edm
    # (EDM's preconditioned denoiser, any SDE)
    model.parameterization = "auto"
    # the network's noise input: auto (the parameterization's; discrete step labels with training.continuous=False)
    # | time (999·t/T) | step | sigma (σ(t)) | log_sigma (¼·ln(σ/α), EDM's c_noise)
    model.noise_conditioning = "auto"
    model.sigma_data = 0.5  # EDM's σ_data, of the edm parameterization and training.loss='edm'
    # SDE parameters (in `model` as in score_sde)
    model.beta_min = 0.1
    model.beta_max = 20.0
    model.beta_schedule = "linear"  # linear | cosine | quadratic | linear_chain (DDPM's N-step chain exactly; VP, sub-VP)
    model.num_scales = 1000
    # VP only: rescale the schedule to zero terminal SNR (Lin et al. 2024; α(T) = 0): needs a 'v' or 'velocity' target
    model.zero_terminal_snr = False
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
    # text conditioning (sde_diffusion/models/text_conditioning.py): captions enter through the noise embedding
    # (pooled) and cross-attention; the empty caption is the unconditional score (classifier-free guidance)
    model.text = text = ml_collections.ConfigDict()
    text.encoder = "none"  # none | scratch (a small transformer trained with the network) | clip (frozen)
    text.pretrained = placeholder(str)  # clip: a local folder with a CLIP text model and its tokenizer
    text.dim = 128  # scratch: width, layers, heads and token length of the text transformer
    text.depth = 2
    text.num_heads = 4
    text.max_length = 16
    model.cross_attn_resolutions = placeholder(tuple)  # U-Nets: resolutions with cross-attention; None → attn_resolutions
    model.cross_attn_heads = 1
    # self-attention head width in channels (every network with attention); 0 → one head as wide as the layer
    model.attention_head_dim = 0

    # latent score-based model (sde_diffusion/latent.py): the SDE, loss, network and sampler work on the latents of
    # a frozen first-stage autoencoder (model.autoencoder), scaled to unit variance; samples are decoded to pixels
    model.latent = False
    model.autoencoder = autoencoder = ml_collections.ConfigDict()
    # a local diffusers AutoencoderKL folder (the Stable Diffusion VAE format, or a pipeline folder with vae/), or
    # an autoencoder.pth of --mode train_autoencoder; None → <workdir>/autoencoder/autoencoder.pth
    autoencoder.pretrained = placeholder(str)
    # --mode train_autoencoder (sde_diffusion/models/autoencoder.py): a KL-regularised convolutional autoencoder
    autoencoder.downsample = 2  # f ∈ {1, 2, 4, 8}: latents are (latent_channels, H/f, W/f)
    autoencoder.latent_channels = 4
    autoencoder.nf = 64
    autoencoder.ch_mult = placeholder(tuple)  # widths per level (log2 f + 1 of them); None → (1, 2, 4, 4)[:levels]
    autoencoder.num_res_blocks = 1
    autoencoder.kl_weight = 1e-6  # weight of the per-pixel KL against the per-pixel reconstruction loss
    autoencoder.loss = "l1"  # l1 | l2 reconstruction loss
    autoencoder.batch_size = 64
    autoencoder.n_iters = 2000
    autoencoder.lr = 1e-3  # Adam, constant after autoencoder.warmup steps
    autoencoder.warmup = 100
    autoencoder.log_freq = 100
    autoencoder.snapshot_freq_for_preemption = 500  # workdir/autoencoder/checkpoints-meta/checkpoint_<step>.pth
    autoencoder.eval_fid = True  # rFID of the test split's reconstructions in the report (Inception weights needed)

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
    optim.beta2 = 0.999  # Adam's second-moment decay (EDM2 uses 0.99)
    optim.eps = 1e-8
    optim.weight_decay = 0.0
    optim.warmup = 5000
    optim.grad_clip = 1.0  # max gradient norm; negative disables clipping
    # after warm-up: constant | inverse_sqrt (EDM2: lr / √max(step / optim.ref_steps, 1))
    optim.schedule = "constant"
    optim.ref_steps = 10000  # inverse_sqrt: the step where the decay starts

    # --mode distill (sde_diffusion/distillation.py, jobs/distill.py): a few-step student of a trained teacher,
    # trained in its own workdir with the machinery of --mode train; the student's network is the config's and
    # starts from the teacher's EMA weights. With model.parameterization="auto" and sampling.method="auto" the
    # student predicts and samples as its method says (sde_diffusion/students.py)
    config.distill = distill = ml_collections.ConfigDict()
    # consistency (distillation with the teacher's ODE) | consistency_training (iCT's recipe from the teacher's
    # weights, no teacher calls) | progressive (rounds halving a DDIM sampler's steps); None: not a student
    distill.method = placeholder(str)
    # the teacher: a workdir with config.json (or config.py) and checkpoints/checkpoint_<k>.pth (a converted
    # score_sde or diffusers model: its config file as config.py and the converted .pth in checkpoints/)
    distill.teacher_workdir = placeholder(str)
    distill.teacher_checkpoint = placeholder(int)  # its numbered checkpoint k; None → the newest
    distill.solver = "heun"  # consistency: the teacher's ODE step between adjacent levels (a fixed-step sampler)
    distill.levels = 18  # consistency: N time levels (Song et al. 2023); consistency_training follows iCT's curriculum
    # consistency: how the level n is drawn and weighted: uniform (Song et al. 2023: uniform n, weight 1) | lognormal
    # (iCT: log-normal over ln s, weight 1/(s_{n+1} − s_n), as consistency_training always does)
    distill.level_sampling = "uniform"
    # consistency: the target network is this EMA of the student (Song et al. 2023: 0.95); 0: the student itself
    # (stop-gradient), as consistency_training always does (iCT)
    distill.target_ema = 0.95
    distill.huber_c = placeholder(float)  # consistency losses: pseudo-Huber c; None → 0.00054·√d (iCT)
    distill.steps = 4  # progressive: the student's final DDIM steps
    distill.teacher_steps = 64  # progressive: the first teacher's DDIM steps (each round halves them; power of 2)

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


def validate_config(config) -> None:
    """Check values and combinations before any compute is spent; raises ConfigError naming the key.
    The checks are each section's owner's (see sde_diffusion/validation.py, imported here only when called, so
    that the schema itself needs only ml_collections)."""
    from .validation import validate_config as validate
    validate(config)


def config_from_dict(values, source: str = "the config") -> ml_collections.ConfigDict:
    """default_config() with the keys of `values` (a config's to_dict(), e.g. a workdir's config.json) set; lists
    become tuples where the schema has tuples. ConfigError naming a key the schema does not define."""
    config = default_config()

    def fill(section: ml_collections.ConfigDict, given, prefix: str) -> None:
        for key, value in given.items():
            if key not in section:
                raise ConfigError(f"{source} sets {prefix}{key}, which this version of sde_diffusion does not define")
            if isinstance(section[key], ml_collections.ConfigDict):
                fill(section[key], value, f"{prefix}{key}.")
                continue
            if isinstance(value, list):
                value = tuple(value)
            try:
                setattr(section, key, value)
            except (TypeError, ValueError) as err:
                raise ConfigError(f"{source}: {prefix}{key}={value!r}: {err}") from None

    fill(config, values, "")
    return config
