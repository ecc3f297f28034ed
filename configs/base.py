"""Base configuration: every field, commented. Experiment configs override it.

Never run directly; e.g.
  python experiments/train.py --config configs/predator_prey.py --workdir workdirs/pp
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    # Seed of the data (trajectory pool and test set) and of the autoencoder.
    # Latent-model members have their own seeds (train.seeds).
    c.seed = 0

    # ---------------------------------------------------------------- system
    c.system = ml_collections.ConfigDict()
    c.system.name = ""  # one of macro_jax.systems (e.g. "predator_prey")
    c.system.params = ml_collections.ConfigDict()  # keyword arguments of its make_* factory

    # ---------------------------------------------------------------- data
    c.data = ml_collections.ConfigDict()
    # Training pool: configurations the labels are drawn from, in
    # trajectory-major order (a run with n configurations takes the first n).
    c.data.n_pool_trajectories = 0
    c.data.pool_integrator = "euler"  # "euler" or "rk4"; micro step below
    c.data.pool_dt = 0.01  # microscopic time step
    c.data.pool_steps = 3000  # steps per trajectory
    c.data.pool_save_every = 10  # keep every k-th step
    # Held-out test trajectories: the TRUE observables the rollout is scored on.
    c.data.n_test_trajectories = 0
    c.data.test_integrator = "rk4"
    c.data.test_dt = 0.01
    c.data.test_steps = 3000
    c.data.test_save_every = 1  # frames are also the rollout's output times
    c.data.dtype = "float32"  # storage dtype (integration is float64)
    # True: pool and test runs are ONE call of the system's trajectory_fn (one
    # key), the last n_test_trajectories runs being the test set; the test_*
    # settings must then equal the pool_* ones. The reference LJ protocol needs
    # it: every run shares the initial positions, only T0 varies.
    c.data.one_ensemble = False
    # 0: simulate all trajectories in one call and keep them in memory (npz).
    # > 0: simulate this many at a time; each finished block of pool frames is
    # written to data/pool/ at once (an interrupted generation resumes at the
    # next block) and read back memory-mapped, and every stage streams the
    # pool in chunks. For pools larger than memory (Allen-Cahn: 9 GB).
    c.data.block_trajectories = 0
    # Keep only pool frames whose first observable exceeds this (None keeps
    # all). Allen-Cahn: 1e-4 drops the frames after the ring has vanished.
    c.data.pool_keep_above = None

    # ---------------------------------------------------------------- autoencoder (stage 1)
    c.autoencoder = ml_collections.ConfigDict()
    c.autoencoder.latent_dim = 0  # d = number of observables + closure dimension
    c.autoencoder.hidden = (32, 32)  # encoder widths; the decoder mirrors them
    c.autoencoder.activation = "softplus"
    c.autoencoder.bias_init = "torch"  # "torch" (U(+-1/sqrt(fan_in))) or "zeros"
    c.autoencoder.decoder_uses_observables = False  # decoder input = closure (+ observables)
    c.autoencoder.lambda_cond = 1e-6  # weight of L_cond = E(kappa(J J^T) - 1)^2; >= 0
    c.autoencoder.cond_rows = "all"  # rows of J in L_cond: "all" or "closure"
    # "linear_first_layer" (J = J_rest W1, J never formed) or "generic" (full jacrev).
    c.autoencoder.jacobian = "linear_first_layer"
    c.autoencoder.n_configs = 0  # pool configurations used to train the AE; 0 = all
    # Origin of the encoder's (unnormalised) input: "data" (x as stored) or
    # "box_centre" (x less the system's centre_shift; particles: positions in
    # [-L/2, L/2), the reference's LAMMPS frame, instead of [0, L)).
    c.autoencoder.input_origin = "data"
    c.autoencoder.epochs = 10
    c.autoencoder.batch_size = 256
    c.autoencoder.lr = 1e-4  # Adam with coupled L2 weight decay (PyTorch Adam)
    c.autoencoder.weight_decay = 1e-4
    c.autoencoder.b1 = 0.9
    c.autoencoder.b2 = 0.95
    c.autoencoder.log_every = 1
    # Save the training state every this many epochs (workdir/autoencoder/resume.eqx;
    # 0 = never) so that an interrupted AE resumes; bookkeeping, not part of the AE's spec.
    c.autoencoder.checkpoint_every = 0

    # ---------------------------------------------------------------- latent model
    c.model = ml_collections.ConfigDict()
    c.model.name = "onsagernet"  # "onsagernet", "mlp" or "gfinn"
    c.model.onsagernet = ml_collections.ConfigDict()
    # "separate" (reference Predator-Prey: tanh heads, no forcing) or
    # "shared" (reference Allen-Cahn / LJ: residual trunk, forcing).
    c.model.onsagernet.variant = "separate"
    c.model.onsagernet.trunk_widths = ()  # shared trunk (variant "shared" only)
    c.model.onsagernet.potential_widths = (32, 32, 32)  # potential head (variant "separate")
    c.model.onsagernet.matrix_widths = (64, 64)  # matrix head hidden widths (variant "separate")
    c.model.mlp = ml_collections.ConfigDict()
    c.model.mlp.widths = (256, 256)
    c.model.mlp.activation = "relu"
    # GFINN (GENERIC form L grad E + M grad S, degeneracies by construction).
    c.model.gfinn = ml_collections.ConfigDict()
    c.model.gfinn.rank = 0  # K, the number of skew matrices per operator; 0 = latent_dim (reference)
    c.model.gfinn.widths = (256, 256)  # hidden widths of E, S and the Sigma networks
    c.model.gfinn.activation = "tanh"

    # ---------------------------------------------------------------- latent dynamics (stage 2)
    c.train = ml_collections.ConfigDict()
    # Losses to run, each "z" (L_z, all forces), "x" (L_x, all forces) or
    # "xp:<p>" (L_x,p with a fraction p of the sites per configuration,
    # drawn uniformly without replacement, weight 1/p) or "xp:<p>:importance"
    # (k = p N i.i.d. draws from the system's site proposal q, each weighted
    # by 1/(N q); systems with a site_proposal_fn only).
    c.train.runs = ("z", "xp:0.2")
    # Force budget per seed, in site forces (atoms or grid coordinates).
    # A run uses budget / n_sites configurations (z, x) or budget / k (xp).
    c.train.budget = 300_000
    # "offline": labels drawn once per configuration before training;
    # "online": the jitted step draws sites and computes their forces (xp only).
    c.train.label_mode = "offline"
    # L_x,p only. False: each member draws its own subsets (members are
    # independent experiments, as the reference's Predator-Prey seeds). True:
    # one draw labels every member, which then differ only in initialisation
    # and shuffling (the reference's LJ ensembles; labels and memory paid once).
    c.train.shared_subsets = False
    # With shared_subsets: the seed whose label key draws the one subset (None:
    # the first of train.seeds). experiments/structures.py sets it when it
    # trains an ensemble in member groups (structures.group_size), so that
    # every group labels with the whole ensemble's draw.
    c.train.subset_seed = config_dict.placeholder(int)
    # Which pool configurations a run labels: "first" (the first n in
    # trajectory-major order, as the reference's Predator-Prey and LJ) or
    # "random" (n drawn without replacement over the whole pool, as the
    # reference's Allen-Cahn; one draw per run, shared by its members, and
    # nested: a run with fewer configurations takes a prefix of the same draw).
    c.train.draw_configs = "first"
    # Seed of the "random" draw (None: the experiment seed, which also fixes the
    # data and the autoencoder). Set it to repeat a run over data draws on the
    # same data and autoencoder, in the same workdir: such runs are saved as
    # runs/<name>_draw<seed>/ and their rows carry draw_seed.
    c.train.draw_seed = config_dict.placeholder(int)
    c.train.seeds = (1, 2, 3)  # one ensemble member per seed, trained in one vmap
    c.train.epochs = 2000
    c.train.batch_size = 256
    c.train.lr = 5e-3
    c.train.b1 = 0.9
    c.train.b2 = 0.999
    c.train.eps = 1e-8
    c.train.weight_decay = 0.0
    c.train.patience = 100  # plateau epochs (PyTorch semantics) before lr *= plateau_factor
    c.train.plateau_factor = 0.5
    c.train.plateau_rtol = 1e-4
    c.train.min_lr = 5e-6
    # L_x,p only (an improvement of ours; False = the reference): subtract each
    # sample's minimum over g, which no model can go below and which dominates
    # the LJ-800 loss, so the logged loss and the plateau schedule see only the
    # part the model can reduce (losses.loss_xp_excess). The gradients are
    # the same; only the schedule's decisions (when the rate halves) differ.
    # On LJ-800 the rate then halves later and the error is worse (README).
    c.train.xp_excess = False
    c.train.log_every = 100
    # Save the training state to runs/<run>/resume.eqx every this many epochs
    # (0 = never); an interrupted run started again continues from it and ends
    # with the same numbers as an uninterrupted one.
    c.train.checkpoint_every = 0
    # Every this many epochs (and after the last), evaluate the members on
    # held-out data outside the jitted epoch: L_z and L_x on
    # diagnostics.holdout pool configurations with all forces (not counted in
    # the budget; result.json reports them as diagnostic_force_computations)
    # and the test rollout error; the curves go to runs/<run>/history.npz as
    # monitor/<name>. 0 = off. Bookkeeping: it never changes a run's numbers.
    c.train.monitor_every = 0
    # Model selection (an improvement of ours, not the paper's protocol; 0 = off):
    # hold out the last select_fraction of a run's labelled configurations
    # (labelled like the rest and counted in its budget, so it trains on fewer),
    # score every member on them with the run's own loss every select_every
    # epochs and after the last, and keep each member's parameters at its best
    # score. A held-out L_x,p needs no extra forces and is unbiased for L_x there.
    c.train.select_every = 0
    c.train.select_fraction = 0.1
    # Per-loss overrides of the fields above, e.g. {"z": {"patience": 50}}.
    c.train.per_loss = ml_collections.ConfigDict()
    c.train.precompute_chunk = 1024  # configurations per labelling and precompute batch (bounds memory)

    # ---------------------------------------------------------------- evaluation
    c.eval = ml_collections.ConfigDict()
    c.eval.substeps = 1  # RK4 steps per test frame interval
    c.eval.plot_trajectory = 0  # test trajectory shown in rollout.png
    # Frames whose true observable norm is at most this fraction of its maximum
    # over the test set are left out of the error (Allen-Cahn reference: 1e-4,
    # after the ring has vanished); 0 keeps every frame.
    c.eval.relative_floor = 0.0

    # ---------------------------------------------------------------- diagnostics (experiments/diagnostics.py)
    c.diagnostics = ml_collections.ConfigDict()
    # Pool configurations held out for the monitored curves (train.monitor_every):
    # the first of one fixed permutation of the pool (key: seed) that the run
    # does not label, so mostly the same rows for every run of an experiment.
    c.diagnostics.holdout = 256
    # Pool configurations over which cond(J J^T) and the spectrum of J are
    # computed (0 = all; else this many, evenly spaced over the pool).
    c.diagnostics.cond_configs = 0
    # autoencoder.lambda_cond values of the lambda sweep (--mode=lambda_sweep);
    # each trains its own autoencoder and every run of train.runs.
    c.diagnostics.lambda_values = (0.0, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2)

    # ---------------------------------------------------------------- sweep (experiments/sweep.py)
    c.sweep = ml_collections.ConfigDict()
    c.sweep.budgets = ()  # force budgets to sweep
    c.sweep.runs = ()  # losses to sweep, as in train.runs
    # Per loss ("z", "x", "xp"): training-set sizes in configurations. A run
    # whose loss is here sweeps these (budget = configurations x sites with
    # forces) instead of sweep.budgets (Fig. 4: 250..3000 full vs 500..5000
    # partial configurations).
    c.sweep.n_configs = ml_collections.ConfigDict()

    # ---------------------------------------------------------------- structures (experiments/structures.py)
    c.structures = ml_collections.ConfigDict()
    c.structures.models = ()  # latent models (model.name values) compared on train.runs
    # 0: each ensemble (train.seeds) trains as one run. g > 0: ensembles not
    # finished as one run train in groups of g consecutive seeds, each its own
    # resumable run (runs/<model>_seeds<a>-<b>_<run>), sharing the whole
    # ensemble's subsets (train.subset_seed); processes on one workdir split
    # the groups, results exported with --out resume elsewhere (--resume_from),
    # and the groups are reported as one ensemble. Members are independent (one
    # vmap, per-member optimiser state), so a group's members equal the whole
    # run's up to floating-point reduction order.
    c.structures.group_size = 0
    return c
