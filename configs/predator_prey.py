"""Predator-Prey (N = 100, d = 4): the paper's protocol (experiments.md section 1).

Reproduction (L_z vs L_x,p at one budget, 3 seeds):
  python experiments/train.py --config configs/predator_prey.py --workdir workdirs/pp
Budget sweep (writes docs/results/predator_prey.json):
  python experiments/sweep.py --config configs/predator_prey.py --workdir workdirs/pp_sweep \
      --out docs/results/predator_prey.json
lambda_cond sweep (writes docs/results/lambda_cond.json, .png, .md):
  python experiments/diagnostics.py --mode=lambda_sweep --config configs/predator_prey.py:quick \
      --workdir workdirs/diag_lambda --out docs/results/lambda_cond.json
Variants (config argument after the colon):
  :quick  what `make run` runs: smaller pool and fewer epochs, minutes on 2 cores.
  :smoke  seconds; used by the test suite.
"""

from configs import base


def get_config(variant: str = ""):
    c = base.get_config()
    c.seed = 0
    c.system.name = "predator_prey"
    c.system.params.n_cells = 50
    c.system.params.a = 3.0
    c.system.params.b = 0.4

    # 1600 Euler trajectories (dt 0.01, T = 30, every 10th step): 480,000 configurations.
    c.data.n_pool_trajectories = 1600
    c.data.pool_integrator = "euler"
    c.data.pool_dt = 0.01
    c.data.pool_steps = 3000
    c.data.pool_save_every = 10
    # 100 fresh RK4 trajectories, every step kept; the rollout runs to T = 30.
    c.data.n_test_trajectories = 100
    c.data.test_integrator = "rk4"
    c.data.test_dt = 0.01
    c.data.test_steps = 3000
    c.data.test_save_every = 1

    # Encoder 100 -> 32 -> 32 -> 2 (softplus); the decoder also sees the means.
    c.autoencoder.latent_dim = 4
    c.autoencoder.hidden = (32, 32)
    c.autoencoder.decoder_uses_observables = True
    c.autoencoder.lambda_cond = 1e-6
    c.autoencoder.cond_rows = "all"
    c.autoencoder.epochs = 11  # the shipped checkpoint is after >= 11 epochs
    c.autoencoder.batch_size = 256

    c.model.name = "onsagernet"
    c.model.onsagernet.variant = "separate"

    c.train.runs = ("z", "xp:0.2")
    c.train.budget = 300_000
    c.train.seeds = (1, 2, 3)
    c.train.epochs = 2000
    c.train.batch_size = 256
    c.train.lr = 5e-3
    c.train.patience = 100
    c.train.min_lr = 5e-6
    c.train.per_loss = {"z": {"patience": 50}}

    c.sweep.budgets = (60_000, 300_000, 2_400_000)
    c.sweep.runs = ("z", "x", "xp:0.25", "xp:0.2")

    if variant == "quick":
        # `make run`: the protocol shrunk to minutes on a 2-core CPU.
        c.data.n_pool_trajectories = 200  # 60,000 configurations
        c.data.n_test_trajectories = 20
        c.autoencoder.epochs = 4
        c.train.budget = 300_000  # L_z: 3,000 configurations; L_x,p (p = 1/5): 15,000
        c.train.epochs = 300
        c.train.log_every = 50
        c.sweep.budgets = (60_000, 300_000)
    elif variant == "smoke":
        c.data.n_pool_trajectories = 4
        c.data.pool_steps = 1000  # 4 x 100 = 400 configurations
        c.data.n_test_trajectories = 2
        c.data.test_steps = 200
        c.data.test_save_every = 2
        c.autoencoder.epochs = 1
        c.autoencoder.batch_size = 64
        c.train.budget = 6_000
        c.train.epochs = 3
        c.train.batch_size = 64
        c.train.seeds = (1, 2)
        c.train.runs = ("z", "x", "xp:0.2")
        c.train.log_every = 1
        c.diagnostics.holdout = 64  # the L_x,p run labels 300 of the 400 configurations
        c.sweep.budgets = (2_000, 4_000)
        c.sweep.runs = ("z", "xp:0.2")
    elif variant:
        raise ValueError(f"unknown predator_prey config variant {variant!r}; use '', 'quick' or 'smoke'")
    return c
