"""The privacy commands: the calculator (epsilon of a planned run, or the noise multiplier that meets
a target epsilon) and the empirical audit."""

from __future__ import annotations

from ..core.errors import UserError
from .common import _finite, _rounds, _seed, dumps


def _cmd_privacy(args) -> int:
    from ..privacy import accounting

    _check_privacy_args(args)
    z = args.noise_multiplier
    if args.sigma is not None:
        z = args.sigma / args.clip
    from dp_accounting.mechanism_calibration import NoBracketIntervalFoundError

    try:
        out = _privacy_report(accounting, args, z)
    except NoBracketIntervalFoundError:  # dp-accounting's calibration gives up on a target it cannot bracket
        raise UserError(
            f"--target-epsilon {args.target_epsilon:g} cannot be reached at delta {args.delta:g} with "
            "this sampling and number of rounds (the noise search found no bracket); try a smaller "
            "target or fewer rounds"
        ) from None
    if args.json:
        print(dumps(out))
        return 0
    print(f"mode {out['mode']}: {out['mechanism']}")
    print(
        f"neighbouring {out['neighbouring']}, delta {out['delta']:g}, noise multiplier sigma/C "
        f"{out['noise_multiplier']:.6g}"
    )
    rdp = "n/a (RDP does not model sampled replace-one)" if out["epsilon_rdp"] is None else f"{out['epsilon_rdp']:.4f}"
    print(f"epsilon (PLD / exact): {out['epsilon_pld']:.4f}    epsilon (RDP): {rdp}")
    spread = out.get("participations_spread")
    if spread:
        # local/dpsgd compose a client's own participations (the worst client's count); central DP's
        # epsilon composes every round's Poisson draw of the whole population, whoever was drawn
        of = "epsilon is for the max" if out["mode"] != "central" else "central DP's epsilon composes every round"
        print(
            f"participations per client under the seeded {args.sampling} schedule (seed {args.seed}): min "
            f"{spread['min']}, median {spread['median']:g}, max {spread['max']} ({of})"
        )
    elif out["mode"] == "bandmf":
        print(f"participations: {out['participations']} per client (cyclic groups: once every ceil(N/K) rounds)")
    elif out["mode"] != "central" and args.participations is None:
        print(
            f"participations: {out['participations']} (every round: give --clients and --clients-per-round "
            f"to simulate the seeded schedule)"
        )
    if out.get("epsilon_paper") is not None:
        print(
            f"paper convention, NOT a valid bound for epsilon >= 1: per release {out['epsilon_paper']:.4f}, "
            f"paper code's tracker {out['epsilon_paper_tracker']:.4f}"
        )
    return 0


def _check_privacy_args(args) -> None:
    """Every calculator option in its domain, named by its flag (before any accounting)."""
    given = [
        f
        for f, v in (
            ("--noise-multiplier", args.noise_multiplier),
            ("--sigma", args.sigma),
            ("--target-epsilon", args.target_epsilon),
        )
        if v is not None
    ]
    if len(given) > 1:
        raise UserError(
            f"give one of --noise-multiplier, --sigma with --clip, or --target-epsilon; got {' and '.join(given)}"
        )
    if not given:
        raise UserError("give --noise-multiplier Z, --sigma S with --clip C, or --target-epsilon E")
    _finite("--noise-multiplier", args.noise_multiplier, low=0, what="noise multiplier")
    _finite("--sigma", args.sigma, low=0)
    _finite("--clip", args.clip)
    if args.sigma is not None and (args.clip is None or args.clip <= 0):
        raise UserError(f"--sigma needs --clip C > 0 (got {args.clip}); the noise multiplier is sigma / C")
    if args.clip is not None and args.sigma is None:
        raise UserError("--clip is used only with --sigma")
    _finite("--target-epsilon", args.target_epsilon, low=0, low_open=True, what="target epsilon")
    _finite("--delta", args.delta, low=0, high=1, low_open=True, high_open=True)
    _finite("--sampling-rate", args.sampling_rate, low=0, high=1, low_open=True)
    _finite("--batch-sampling-rate", args.batch_sampling_rate, low=0, high=1, low_open=True)
    _rounds("--rounds", args.rounds)
    _seed("--seed", args.seed)
    _finite("--tensors", args.tensors, low=1)
    _finite("--local-steps", args.local_steps, low=1)
    _finite("--clients", args.clients, low=1)
    if args.clients_per_round is not None:
        if args.clients is None:
            raise UserError("--clients-per-round needs --clients (the sampling rate is their ratio)")
        _finite("--clients-per-round", args.clients_per_round, low=1, high=args.clients, what="clients per round")
    _finite("--participations", args.participations, low=0, high=args.rounds)
    if args.mode != "dpsgd" and args.batch_sampling_rate is not None:
        raise UserError(f"--batch-sampling-rate is used by --mode dpsgd only, not {args.mode}")
    if args.mode == "dpsgd" and args.batch_sampling_rate is None:
        raise UserError("--mode dpsgd needs --batch-sampling-rate (batch size / client examples)")


def _privacy_report(accounting, args, z):
    return accounting.report(
        args.mode,
        delta=args.delta,
        noise_multiplier=z,
        rounds=args.rounds,
        tensors=args.tensors,
        neighbouring=args.neighbouring,
        participations=args.participations,
        clients=args.clients,
        clients_per_round=args.clients_per_round,
        sampling_rate=args.sampling_rate,
        local_steps=args.local_steps,
        batch_sampling_rate=args.batch_sampling_rate,
        target_epsilon=args.target_epsilon,
        seed=args.seed,
        sampling=args.sampling,
    )


def _cmd_audit(args) -> int:
    from ..config.run_config import load_config
    from ..privacy.audit import auditor as audit

    _finite("--trials", args.trials, low=audit.MIN_TRIALS, what="the number of games played (half with the canary)")
    _finite("--compositions", args.compositions, low=1)
    _finite("--confidence", args.confidence, low=0.5, high=1, low_open=True, high_open=True)
    _seed("--seed", args.seed)
    cfg = load_config(args.config, args.set)
    r = audit.audit(cfg, args.trials, confidence=args.confidence, compositions=args.compositions, seed=args.seed)
    if args.json:
        print(dumps(r))
        return 0 if r["consistent"] else 1
    fmt = lambda x: "n/a" if x is None else f"{x:.4g}"
    print(f"game: {r['game']}")
    print(
        f"{r['trials']} trials ({r['trials_per_second']:.0f} trials/s after {r['seconds_compile']:.1f} s compile), "
        f"delta {r['delta']:g}, confidence {r['confidence']:g}"
    )
    print(
        f"empirical lower bound: epsilon >= {fmt(r['epsilon_lower'])}  (distribution-free "
        f"{fmt(r['epsilon_lower_distribution_free'])}, Gaussian-DP {fmt(r['epsilon_lower_gdp'])}"
        + ("" if r["gdp"]["applicable"] else f": {r['gdp'].get('reason', 'n/a')}")
        + ")"
    )
    print(
        f"attack: TPR {fmt(r['tpr_at_fpr']['0.001'])} at FPR 0.001, {fmt(r['tpr_at_fpr']['0.01'])} at FPR 0.01, "
        f"AUROC {fmt(r['auroc'])}"
    )
    print(f"accountant (upper bound) for this game: epsilon {fmt(r['epsilon_accountant'])}")
    if r["epsilon_paper"] is not None:
        print(f"paper convention (NOT a bound): epsilon {fmt(r['epsilon_paper'])}")
    d = r["detectors"]
    noise = d["noise"]
    if noise.get("applicable"):
        ratios = ", ".join(f"{x['variance_ratio']:.3f}" for x in noise["rounds"] if x.get("n"))
        print(
            f"round noise through the real round ({noise['trials']} trials, {noise['clients']} clients in chunks of "
            f"{noise['chunk']}, then an empty round): variance / stated {ratios}; correlation across rounds "
            f"{noise['round_correlation']:.2g} (allowed +- {noise['correlation_tolerance']:.2g})"
        )
    print(
        f"noise root: {d['root']['root_bits']} bits; two roots equal below bit 32 give different noise: "
        f"{d['root']['passed']}"
    )
    need = (r.get("trials_needed") or {}).get("gdp")
    if need:
        print(
            "trials for the Gaussian-DP bound to reach "
            + ", ".join(
                f"{k} of the accountant's epsilon: {v if v is not None else 'unreachable'}" for k, v in need.items()
            )
        )
    print(r["verdict"])
    return 0 if r["consistent"] else 1
