"""`python -m cma_jax.models.summary` with impossible values: one `error:` line, no traceback."""

import pytest

from cma_jax.models import summary


@pytest.mark.parametrize("args, message", [
    (["--share_dim", "9999"], "d_s=9999 exceeds the narrower tower width 512"),
    (["--reduction_dim", "0"], "adapter reduction_dim (r) must be >= 1, got 0"),
    (["--share_dim", "-1"], "adapter share_dim (d_s) must be >= 0, got -1"),
])
def test_impossible_adapter_shapes_give_one_error_line(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        summary.main(args)
    assert e.value.code == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err.startswith("error: ") and out.err.count("\n") == 1 and message in out.err
