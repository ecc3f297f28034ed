"""Lennard-Jones, 800 atoms (N = 4,800, d = 32): the paper's Fig. 3 protocol
(experiments.md section 3).

One latent model, L_z vs L_x,p at the equal budget of 1e6 atom forces,
10-member ensembles:
  python experiments/train.py --config configs/lj800.py --workdir workdirs/lj800
Both latent models of Fig. 3 (writes docs/results/lj800_structures.json):
  python experiments/structures.py --config configs/lj800.py --workdir workdirs/lj800 \
      --out docs/results/lj800_structures.json
Variants (config argument after the colon; combine with commas, e.g. :fire,short):
  :short  the same data, autoencoder and budgets with 10x fewer dynamics
          epochs (200), what fits a 2-core CPU session; not the protocol.
  :fire   the runs start from our jax-md state (random insertion, FIRE to
          |F| < 1e-3) instead of the reference's LAMMPS state; the data of our
          results before 2026-11-25 (docs/results.md).
  :centred  the encoder reads positions from the box centre, in [-L/2, L/2)
          as the reference's LAMMPS data do, instead of our [0, L)
          (autoencoder.input_origin = "box_centre"); a new autoencoder.
  :smoke  100 atoms, seconds; used by the test suite.
"""

from configs import base


def get_config(variant: str = ""):
    c = base.get_config()
    c.seed = 0
    c.system.name = "particles"
    c.system.params.n_atoms = 800
    c.system.params.box_size = 10.0  # density 0.8
    c.system.params.pair_fn = "lennard_jones"  # eps = sigma = 1, truncated at 2.5, unshifted
    c.system.params.cutoff = 2.5
    c.system.params.mass = 1.0
    c.system.params.temperature_scale = 20.0  # the reference's observable is 20 T
    c.system.params.T0_range = (0.5, 1.5)
    c.system.params.md_batch_size = 20
    # Every run starts from the reference's LAMMPS state (its seeds, random
    # insertion and SHORT minimisation: potential energy -4.28 per atom, so T
    # rises during the runs); needs LAMMPS (installed with the environment).
    c.system.params.initial = "lammps_reference"

    # 100 NVE runs of 250 steps (dt 0.001, every step kept) from ONE minimised
    # configuration and one velocity draw scaled to each run's T0 (the
    # reference's fixed LAMMPS seeds): runs 0-89 train, 90-99 test.
    c.data.one_ensemble = True
    c.data.n_pool_trajectories = 90
    c.data.n_test_trajectories = 10
    for split in ("pool", "test"):
        c.data[f"{split}_integrator"] = "velocity_verlet"
        c.data[f"{split}_dt"] = 0.001
        c.data[f"{split}_steps"] = 250
        c.data[f"{split}_save_every"] = 1

    # Encoder 4800 -> 64 -> 64 -> 31 (softplus), xavier weights, zero biases;
    # the decoder sees the closure only; L_cond on the 31 closure rows.
    c.autoencoder.latent_dim = 32
    c.autoencoder.hidden = (64, 64)
    c.autoencoder.bias_init = "zeros"
    c.autoencoder.decoder_uses_observables = False
    c.autoencoder.lambda_cond = 1e-5
    c.autoencoder.cond_rows = "closure"
    c.autoencoder.epochs = 200
    c.autoencoder.batch_size = 256
    c.autoencoder.lr = 1e-4
    c.autoencoder.log_every = 20

    # Latent models: OnsagerNet with a residual trunk [256, 256, 256] and
    # forcing (420,704 parameters); the MLP 32 -> 256 -> 256 -> 32 (82,464).
    c.model.name = "onsagernet"
    c.model.onsagernet.variant = "shared"
    c.model.onsagernet.trunk_widths = (256, 256, 256)
    c.model.mlp.widths = (256, 256)
    c.model.mlp.activation = "relu"

    # L_z: 1,250 configurations (the first 5 runs) x 800 atoms; L_x,p: 20,000
    # (the first 80 runs) x 50 atoms. Both 1e6 atom forces.
    c.train.runs = ("z", "xp:1/16")
    c.train.budget = 1_000_000
    c.train.seeds = tuple(range(1, 11))  # the 10 ensemble members
    c.train.epochs = 2000
    c.train.batch_size = 256
    c.train.lr = 1e-3
    c.train.patience = 200
    c.train.min_lr = 1e-5
    c.train.log_every = 100
    c.train.checkpoint_every = 50  # hours-long runs: resumable
    c.train.per_loss = {"xp": {"batch_size": 512}}
    # The reference's ensemble: members share the data (for L_x,p: the same 50
    # atoms per configuration) and differ in initialisation and shuffling.
    c.train.shared_subsets = True
    c.train.precompute_chunk = 256

    # The rollout steps at the MD dt (RK4, 249 steps), scored on T.
    c.eval.substeps = 1

    # experiments/structures.py: latent models compared on train.runs.
    c.structures.models = ("mlp", "onsagernet")

    variants = [v for v in variant.split(",") if v]
    for v in variants:
        if v not in ("short", "fire", "centred", "smoke"):
            raise ValueError(f"unknown lj800 config variant {v!r}; use 'short', 'fire', 'centred', 'smoke' or a "
                             "comma-separated list of them")
    if "fire" in variants:
        c.system.params.initial = "fire"
    if "centred" in variants:
        c.autoencoder.input_origin = "box_centre"
    if "short" in variants:
        c.train.epochs = 200
        c.train.patience = 20
        c.train.log_every = 20
    if "smoke" in variants:
        c.system.params.n_atoms = 100
        c.system.params.box_size = 5.0  # density 0.8; the smallest box for cut-off 2.5
        c.system.params.md_batch_size = 3
        c.data.n_pool_trajectories = 4
        c.data.n_test_trajectories = 2
        for split in ("pool", "test"):
            c.data[f"{split}_steps"] = 50
        c.autoencoder.latent_dim = 6
        c.autoencoder.hidden = (16, 16)
        c.autoencoder.epochs = 2
        c.autoencoder.batch_size = 32
        c.autoencoder.log_every = 1
        c.model.onsagernet.trunk_widths = (16, 16)
        c.model.mlp.widths = (16, 16)
        c.model.gfinn.widths = (16, 16)
        c.structures.models = ("mlp", "onsagernet", "gfinn")
        c.train.runs = ("z", "xp:1/10")
        c.train.budget = 2_000  # L_z: 20 configurations x 100 atoms; L_x,p: 200 x 10 atoms
        c.train.seeds = (1, 2)
        c.train.epochs = 3
        c.train.batch_size = 16
        c.train.per_loss = {"xp": {"batch_size": 32}}
        c.train.log_every = 1
        c.train.precompute_chunk = 64
    return c
