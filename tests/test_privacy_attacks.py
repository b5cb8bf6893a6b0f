"""Privacy attacked from the outside: what an observer of a run's outputs could learn beyond what
the accountant says. Each test plays the observer against the real code path (run folders, the
jitted round), not a re-derivation of a formula."""

from __future__ import annotations

import collections
import csv
import json
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from fedlora_jax import cli
from fedlora_jax.adapters import peft_io
from fedlora_jax.config.run_config import load_config
from fedlora_jax.core import randomness
from fedlora_jax.privacy import mechanisms as modes
from fedlora_jax.runs.reporting import SCORES
from fedlora_jax.runs.runner import build_model, run

MODES = {
    "none": [],
    "local": ["dp.mode=local", "dp.noise=multiplier", "dp.noise_multiplier=1.0"],
    "central": ["dp.mode=central", "fl.sampling=poisson", "dp.noise=multiplier", "dp.noise_multiplier=1.0"],
    "dpsgd": ["dp.mode=dpsgd", "dp.noise=multiplier", "dp.noise_multiplier=1.0", "dp.clip_a=1.0"],
}


def _tiny(*extra):
    return load_config(
        "tiny",
        [
            "fl.rounds=3",
            "fl.num_clients=6",
            "fl.clients_per_round=3",
            "fl.local_steps=2",
            "data.synthetic_examples=120",
            "eval_every=3",
            "checkpoint_every=0",
            *extra,
        ],
    )


# ----------------------------------------------------------------------------- key domains


class _DrawRecorder:
    """Records the key data of every JAX random draw (through jax's one bits primitive, inside jit,
    vmap and scan alike) and the seed of every numpy Generator, each with the code that asked."""

    def __init__(self, monkeypatch):
        from jax._src.random import core as rcore

        self.jax_draws = []
        self.np_seeds = []
        original_bits = rcore._random_bits

        def where():
            frames = [
                f
                for f in traceback.extract_stack()[:-2]
                if "fedlora_jax" in f.filename and not f.filename.endswith("randomness.py")
            ]
            return f"{frames[-1].filename.split('fedlora_jax')[-1]}:{frames[-1].name}" if frames else "outside"

        def bits(key, bit_width, shape):
            tag = where()

            def record(data):
                data = np.asarray(data)
                for row in data.reshape(-1, data.shape[-1]):
                    self.jax_draws.append((tuple(int(v) for v in row), tag))

            jax.debug.callback(record, jax.random.key_data(key))
            return original_bits(key, bit_width, shape)

        original_rng = np.random.default_rng

        def default_rng(seed=None):
            if seed is not None and not isinstance(seed, (np.random.Generator, np.random.BitGenerator)):
                # the stream a seed gives (SeedSequence pads entropy with zeros: [s, 1] == [s, 1, 0])
                state = tuple(np.random.SeedSequence(seed).generate_state(4).tolist())
                self.np_seeds.append((state, where()))
            return original_rng(seed)

        jax.clear_caches()  # jax's own jitted samplers must be traced again through the patch
        monkeypatch.setattr(rcore, "_random_bits", bits)
        monkeypatch.setattr(np.random, "default_rng", default_rng)

    def close(self):
        jax.clear_caches()


def _shared(records):
    """Draws whose key (or numpy stream) was used more than once; for numpy, a recomputation at the
    same call site (the seeded schedule is evaluated again to calibrate) is not a reuse."""
    uses = collections.defaultdict(list)
    for key, tag in records:
        uses[key].append(tag)
    return {k: v for k, v in uses.items() if len(v) > 1}


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("layers", [1, 3])
def test_no_two_random_draws_of_a_run_share_a_key(mode, layers, tmp_path, monkeypatch):
    extra = MODES[mode] + [f"model.num_layers={layers}"]
    if mode == "local":
        extra += ["fl.aggregation=stack"]  # adapters re-initialised every round: one more domain
    cfg = _tiny(*extra, "dp.stats_every=1" if mode == "local" else "dp.stats_every=0", "dp.stats_samples=4")
    rec = _DrawRecorder(monkeypatch)
    try:
        run(cfg, tmp_path / "r", progress=False)
    finally:
        rec.close()
    assert len(rec.jax_draws) > 10
    shared = _shared(rec.jax_draws)
    assert not shared, f"{len(shared)} JAX keys drawn more than once, e.g. {list(shared.values())[:3]}"
    np_shared = {k: v for k, v in _shared(rec.np_seeds).items() if len(set(v)) > 1}
    assert not np_shared, f"numpy streams shared by different uses: {list(np_shared.values())[:3]}"


def test_domains_have_distinct_ids_and_numpy_streams_do_not_alias():
    ids = [randomness.domain_id(d) for d in randomness.DOMAINS]
    assert len(set(ids)) == len(ids)
    streams = set()
    for d in randomness.DOMAINS:
        for args in [(), (0,), (1,), (1, 0), (0, 0), (2, 3), (3, 2)]:
            streams.add(tuple(randomness.np_rng(7, d, *args).integers(0, 2**62, 2).tolist()))
    assert len(streams) == len(randomness.DOMAINS) * 7  # [s, 1] and [s, 1, 0] are different streams


# ----------------------------------------------------------------------------- local DP noise


@pytest.mark.slow
def test_local_release_is_pure_noise_uncorrelated_with_every_public_array(tmp_path):
    """lr 0 and target `update`: the update is 0, so each release is the noise itself. An observer who
    knows the public initial model (base kernels, initial LoRA factors) must find no correlation."""
    sets = [
        "dp.mode=local",
        "dp.target=update",
        "dp.noise=multiplier",
        "dp.noise_multiplier=1.0",
        "fl.lr=0",
        "fl.lr_min=0",
        "fl.clients_per_round=1",
        "fl.num_clients=4",
        "fl.rounds=4",
        "model.num_layers=3",
        "eval_every=0",
        "checkpoint_every=1",
    ]
    cfg = _tiny(*sets)
    definition, base, lora0, _, _ = build_model(cfg)
    out = tmp_path / "r"
    adapters = []
    for r in range(cfg.fl.rounds):  # one round at a time: the adapter after each round is published
        run(cfg, out, resume=r > 0, progress=False, stop_after=1)
        adapters.append(peft_io.load_peft(out / "adapter", definition))
    releases = [jax.tree.map(jnp.subtract, b, a) for a, b in zip([lora0] + adapters[:-1], adapters)]
    noise = [np.asarray(x).ravel() for rel in releases for x in jax.tree.leaves(rel)]
    sigma = 1.0 * cfg.dp.clip_a
    for n in noise:  # the released difference is N(0, sigma^2): the noise really is there
        assert np.std(n) == pytest.approx(sigma, rel=0.2)
    public = [np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(base) + jax.tree.leaves(lora0)]
    public = [p for p in public if p.size >= 64 and np.std(p) > 0]
    worst = 0.0
    for n in noise:
        for p in public + [m for m in noise if m is not n]:
            k = min(n.size, p.size)
            # every alignment an attacker might try: prefixes, and the same shapes
            c = abs(np.corrcoef(n[:k], p[:k])[0, 1])
            worst = max(worst, c * np.sqrt(k))
    # |corr| * sqrt(n) is ~N(0,1) per pair under independence; 6 sigma over a few thousand pairs
    assert worst < 6.0, f"a release correlates with a public array or another release: z = {worst:.1f}"


# ----------------------------------------------------------------------------- central DP


@pytest.mark.parametrize("cohort", ["empty", "all_dropped"])
def test_central_noise_is_added_when_no_client_is_aggregated(cohort):
    from fedlora_jax.federated.simulation import Cohort, build_round, init_state

    cfg = load_config(
        "tiny",
        MODES["central"]
        + [
            "fl.num_clients=6",
            "fl.clients_per_round=2",
            "fl.local_steps=1",
            "fl.batch_size=2",
            "dp.noise_multiplier=0.7",
        ],
    )
    definition, base, lora, _, _ = build_model(cfg)
    mech = modes.build(cfg, lora)
    n = cfg.fl.num_clients
    shape = (n, cfg.fl.local_steps, cfg.fl.batch_size, 8)
    block = {
        "tokens": jnp.ones(shape, jnp.int32),
        "attention_mask": jnp.ones(shape, jnp.int32),
        "loss_mask": jnp.ones(shape, jnp.int32),
        "num_examples": jnp.full((n,), 10.0),
    }
    valid = jnp.zeros(n, bool) if cohort == "empty" else jnp.ones(n, bool)
    lr = jnp.float32(jnp.nan if cohort == "all_dropped" else 1e-2)  # NaN: every update is non-finite
    state = init_state(cfg, lora, n)
    new, m = build_round(definition, cfg, mech, n)(
        state,
        base,
        Cohort.of(block, np.arange(n), np.full((n,), cfg.lora.r), valid),
        randomness.round_keys(cfg.seed, 0),
        lr,
    )
    assert int(jnp.sum(valid & True)) - int(m["dropped"]) == 0  # nobody was aggregated
    # the accounted release: global + N(0, (z C)^2) / expected cohort, per entry
    std = mech.sigma_a / cfg.fl.clients_per_round
    z = np.concatenate([np.asarray(b - a).ravel() for a, b in zip(jax.tree.leaves(lora), jax.tree.leaves(new.lora))])
    assert z.size > 2000
    p = stats.kstest(z / std, "norm").pvalue
    assert p > 1e-3, f"the released change is not N(0, {std:.3g}^2): KS p = {p:.2g}"
    # and it rejects a noise scale 2/3 or 3/2 of the accounted one
    assert stats.kstest(z / (std * 1.5), "norm").pvalue < 1e-3
    assert stats.kstest(z / (std / 1.5), "norm").pvalue < 1e-3


# ----------------------------------------------------------------------------- what leaves the server

PUBLIC_ROW = {
    "round",
    "lr",
    "eval_loss",
    "eval_exact_match",
    "eval_mc_accuracy",
    "eval_mc_accuracy_norm",
    "epsilon",
    "epsilon_mean",
    "delta",
    "epsilon_rdp",
    "epsilon_paper",
    "epsilon_paper_tracker",
    "seconds",
    # the held-out evaluation's n, tokens and 95% intervals: sizes of the server's held-out split
    "eval_loss_n",
    "eval_loss_tokens",
    *(f"{k}{suffix}" for k in SCORES for suffix in ("_n", "_ci95_low", "_ci95_high")),
}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["local", "central", "dpsgd"])
def test_dp_run_publishes_only_accounted_values_unless_asked(mode, tmp_path):
    cohort_public = mode != "central"
    for flag in (False, True):
        out = tmp_path / f"r{flag}"
        s = run(
            _tiny(*MODES[mode], f"dp.publish_client_metrics={str(flag).lower()}", "fl.rounds=2", "eval_every=1"),
            out,
            progress=False,
        )
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        with (out / "metrics.csv").open() as f:
            header = next(csv.reader(f))
        allowed = PUBLIC_ROW | ({"clients"} if cohort_public else set())
        keys = set().union(*rows)
        summary = json.loads((out / "summary.json").read_text())
        assert summary == json.loads(json.dumps(s))
        if not flag:
            assert keys <= allowed, f"unaccounted fields published: {sorted(keys - allowed)}"
            assert set(header) <= allowed
            assert "final_train_loss" not in summary
            assert not any(x.startswith(modes.UNPROTECTED_PREFIX) for x in summary["privacy"]["outside_guarantee"])
            assert not any(k.startswith(modes.UNPROTECTED_PREFIX) for k in set(summary) | set(summary["privacy"]))
            if not cohort_public:
                assert "max_participations" not in summary["privacy"]
            assert "data" not in summary  # the clients' example counts are not accounted
        else:
            extra = keys - allowed
            assert extra and all(k.startswith(modes.UNPROTECTED_PREFIX) for k in extra)
            assert {"unprotected_loss", "unprotected_update_norm", "unprotected_dropped"} <= extra
            assert set(summary["privacy"]["outside_guarantee"]) >= extra
            assert "unprotected_final_train_loss" in summary and "final_train_loss" not in summary
            assert "OUTSIDE" in summary["privacy"]["published"]
            assert summary["unprotected_data"]["kept"] > 0 and "data" not in summary
            assert "unprotected_data" in summary["privacy"]["outside_guarantee"]


@pytest.mark.parametrize("mode", ["local", "central"])
def test_scaffold_is_refused_where_its_controls_are_not_private(mode, tmp_path, capsys):
    rc = cli.main(
        [
            "run",
            "tiny",
            "--out",
            str(tmp_path / "r"),
            "--no-progress",
            "--set",
            "fl.algorithm=scaffold",
            *sum((["--set", x] for x in MODES[mode]), []),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "scaffold" in err[0] and mode in err[0]
    assert not (tmp_path / "r").exists()


def test_central_with_stacking_is_refused(tmp_path, capsys):
    rc = cli.main(
        [
            "run",
            "tiny",
            "--out",
            str(tmp_path / "r"),
            "--no-progress",
            "--set",
            "fl.aggregation=stack",
            *sum((["--set", x] for x in MODES["central"]), []),
        ]
    )
    assert rc == 2 and "stack" in capsys.readouterr().err


def test_aggregation_weights_are_uniform_under_dp_unless_counts_are_public():
    cfg = _tiny(*MODES["local"])
    lora = build_model(cfg)[2]
    n = jnp.asarray([1.0, 5.0, 9.0])
    np.testing.assert_array_equal(modes.build(cfg, lora).weight(n), [1.0, 1.0, 1.0])
    public = _tiny(*MODES["local"], "dp.public_counts=true")
    np.testing.assert_array_equal(modes.build(public, lora).weight(n), n)
    np.testing.assert_array_equal(modes.build(_tiny(), lora).weight(n), n)  # no DP: example counts


# ----------------------------------------------------------------------------- the registry, the calculator


def test_a_mechanism_registered_at_test_time_runs_end_to_end(tmp_path, monkeypatch):
    """A new mode is one class and one table entry: config, round, loop and summary ask the object."""
    from fedlora_jax.privacy.mechanisms import primitives as prim

    class HalfNoise(modes.Mechanism):
        name = "test_half_noise"

        def calibrate(self):
            self.info = {"mechanism": "test: half of each release, plus N(0, 0.01^2)"}

        def release(self, local, global_, key, rank=None, mstate=None):
            return prim.add_noise(jax.tree.map(lambda x: 0.5 * x, local), key, 0.01, 0.01)

    monkeypatch.setitem(modes.MECHANISMS, HalfNoise.name, HalfNoise)
    s = run(_tiny("dp.mode=test_half_noise", "fl.rounds=2"), tmp_path / "r", progress=False)
    assert s["rounds"] == 2 and s["privacy"]["mechanism"].startswith("test:")
    assert np.isfinite(s["final_eval_loss"])


def test_privacy_calculator_defaults_to_the_most_sampled_client_of_the_seeded_schedule(capsys):
    from fedlora_jax.federated import sampling

    for seed in (0, 1, 7):
        rc = cli.main(
            [
                "privacy",
                "--noise-multiplier",
                "0.5",
                "--rounds",
                "60",
                "--clients",
                "20",
                "--clients-per-round",
                "2",
                "--seed",
                str(seed),
                "--json",
            ]
        )
        out = json.loads(capsys.readouterr().out)
        counts = sampling.participation_counts(seed, 20, 2, "uniform", 60)
        # the run's own sampler for the same seed, not the average ceil(R K / N) = 6
        cfg = load_config("tiny", [f"seed={seed}", "fl.rounds=60", "fl.num_clients=20", "fl.clients_per_round=2"])
        assert rc == 0 and out["participations"] == int(counts.max()) == int(sampling.config_counts(cfg).max())
        assert out["participations_spread"] == {
            "min": int(counts.min()),
            "median": float(np.median(counts)),
            "max": int(counts.max()),
        }
        assert out["participations"] > 6


# ----------------------------------------------------------------------------- the auditor's findings


@pytest.mark.slow
def test_the_published_seed_does_not_reproduce_the_noise(tmp_path):
    """An observer with config.yaml (seed) and the adapter tries to regenerate the noise of a pure-noise
    release (lr 0, target update) with the run's own key tree: with the secret noise root it finds
    nothing; only a config that fixes dp.noise_seed lets it, and the summary says so."""
    from fedlora_jax.privacy.mechanisms import primitives as prim

    sets = [
        "dp.mode=local",
        "dp.target=update",
        "dp.noise=multiplier",
        "dp.noise_multiplier=1.0",
        "fl.lr=0",
        "fl.lr_min=0",
        "fl.clients_per_round=1",
        "fl.num_clients=4",
        "fl.rounds=1",
        "eval_every=0",
        "checkpoint_every=1",
    ]
    for fixed in (False, True):
        cfg = _tiny(*sets, *(["dp.noise_seed=5"] if fixed else []))
        out = tmp_path / f"r{fixed}"
        s = run(cfg, out, progress=False)
        definition, _, lora0, _, _ = build_model(cfg)
        released = jax.tree.map(jnp.subtract, peft_io.load_peft(out / "adapter", definition), lora0)
        published = load_config(str(out / "config.yaml"))
        guess_seed = published.dp.noise_seed if published.dp.noise_seed is not None else published.seed
        from fedlora_jax.federated import sampling

        ids, valid = sampling.for_config(published, 0)
        key = jax.random.fold_in(randomness.round_keys(guess_seed, 0)["client_noise"], int(ids[valid][0]))
        guess = prim.add_noise(
            jax.tree.map(jnp.zeros_like, lora0), key, s["privacy"]["sigma_a"], s["privacy"]["sigma_b"]
        )
        a = np.concatenate([np.ravel(x) for x in jax.tree.leaves(released)])
        b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(guess)])
        corr = np.corrcoef(a, b)[0, 1]
        if fixed:  # the attack works exactly when the user published the noise root, and that is marked
            assert corr > 0.999 and "NOT hold" in s["privacy"]["noise_seed"]
            assert any("noise_seed" in x for x in s["privacy"]["outside_guarantee"])
        else:
            assert abs(corr) * np.sqrt(a.size) < 6.0, f"the published seed reproduces the noise: corr {corr:.3f}"
            assert "secret" in s["privacy"]["noise_seed"]
            # the root lives in the checkpoints (server-private) and in no published file
            metas = [
                json.loads(f.read_text())
                for f in (out / "checkpoints").rglob("*")
                if f.is_file() and f.read_bytes()[:1] == b"{" and b"noise_seed" in f.read_bytes()
            ]
            root = str(metas[0]["noise_seed"])
            assert len(root) > 6
            for f in ("config.yaml", "summary.json", "metrics.jsonl", "metrics.csv"):
                assert root not in (out / f).read_text(), f


def test_evaluation_on_clients_own_data_is_refused_under_dp(tmp_path, capsys):
    rc = cli.main(
        [
            "run",
            "tiny",
            "--out",
            str(tmp_path / "r"),
            "--no-progress",
            "--set",
            "data.eval_per_client=true",
            *sum((["--set", x] for x in MODES["local"]), []),
        ]
    )
    assert rc == 2 and "eval_per_client" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_adaptive_clip_count_has_sensitivity_one_half():
    """The combined multiplier z^-2 = z_u^-2 + (2 sigma_count)^-2 holds only if one client moves the
    noised count by at most 1/2: each client's contribution is b - 1/2 with b in {0, 1}."""
    cfg = load_config(
        "tiny",
        [
            "dp.mode=central",
            "fl.sampling=poisson",
            "dp.scope=global",
            "dp.adaptive_clip=true",
            "dp.noise=multiplier",
            "dp.noise_multiplier=1.0",
            "fl.num_clients=400",
            "fl.clients_per_round=40",
            "dp.clip_count_noise=4.0",
            "dp.clip_a=1.0",
        ],
    )
    lora = build_model(cfg)[2]
    mech = modes.build(cfg, lora)
    state = mech.init_state()
    small = jax.tree.map(lambda x: x + 1e-4, lora)  # an update well within the clip
    large = jax.tree.map(lambda x: x + 10.0, lora)  # far outside it
    vals = {float(mech.client_stat(u, lora, state)) for u in (small, large, lora)}
    assert vals <= {-0.5, 0.5} and len(vals) == 2
