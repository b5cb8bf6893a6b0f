"""Memory planning: the analytic estimate tracks XLA's own memory analysis; misfits say why."""

import pytest

from fedlora_jax import cli
from fedlora_jax.config import load_config
from fedlora_jax.plan import largest_chunk, plan


@pytest.mark.parametrize(
    "sets", [[], ["model.hidden_size=128", "data.seq_len=64", "fl.batch_size=4"], ["dp.mode=dpsgd", "fl.batch_size=4"]]
)
def test_estimate_tracks_xla_memory_analysis(sets):
    out = plan(load_config("tiny", sets), device_gib=1.0, do_measure=True)
    est, measured = out["estimate"]["per_client_bytes"], out["measured"]["per_client_temp_bytes"]
    # an analytic count of saved activations: within a factor of 3 of what XLA allocates
    assert measured / 3 < est < 3 * measured
    assert out["largest_clients_per_chunk"] == 4  # tiny fits its whole cohort in 1 GiB


def test_largest_chunk_and_misfit():
    est = {"base_bytes": 2 * 2**30, "per_client_bytes": 2**30}
    assert largest_chunk(est, 10 * 2**30, cohort=100) == 7  # (9 - 2) GiB / 1 GiB
    assert largest_chunk(est, 10 * 2**30, cohort=3) == 3
    with pytest.raises(
        ValueError, match=r"cannot fit one client: base 2.00 GiB \+ one client 1.00 GiB > 90% of 2.00 GiB"
    ):
        largest_chunk(est, 2 * 2**30, cohort=4)


def test_plan_cli(capsys):
    assert cli.main(["plan", "tiny", "--device-memory", "0.001"]) == 2
    assert "cannot fit one client" in capsys.readouterr().err
    assert cli.main(["plan", "tiny", "--device-memory", "1"]) == 0
    assert "largest clients_per_chunk on 1 GiB" in capsys.readouterr().out
